"""Test isolation: the ops' input-check switch is process-wide; no test may leak a change to it."""
import pytest

from randsac_fast.ops import _dispatch


@pytest.fixture(autouse=True)
def _restore_op_checks():
    saved = _dispatch._CHECKS
    yield
    _dispatch._CHECKS = saved
