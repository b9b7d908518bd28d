"""Test isolation: the ops' input-check switch is process-wide; no test may leak a change to it.
Also the one-process gloo group fixture of the checkpoint tests."""
import pytest
import torch.distributed as dist

from randsac_fast.ops import _dispatch


@pytest.fixture(autouse=True)
def _restore_op_checks():
    saved = _dispatch._CHECKS
    yield
    _dispatch._CHECKS = saved


@pytest.fixture
def group():
    """A one-process gloo process group for the test (checkpoints are collective)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def pytest_collection_modifyitems(items):
    """``-m gpu`` selects the tests that need a CUDA device (skipped elsewhere with that reason)."""
    for item in items:
        for mark in item.iter_markers("skipif"):
            if mark.kwargs.get("reason") == "needs a CUDA device" or "CUDA device" in str(mark.kwargs.get("reason")):
                item.add_marker(pytest.mark.gpu)
                break
