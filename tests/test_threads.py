"""Intra-op threads: chosen as torchrun would, stated at start-up, --threads overrides."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch

from randsac_fast import train
from randsac_fast.runtime.threads import available_cores, choose_threads


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_choose_threads_order():
    assert choose_threads(3, env={"OMP_NUM_THREADS": "1"}, cores=8) == (3, "--threads")
    assert choose_threads(None, env={"OMP_NUM_THREADS": "1"}, cores=8) == (1, "OMP_NUM_THREADS")
    assert choose_threads(None, env={}, cores=8)[0] == 8                              # plain python -m: all cores
    threads, why = choose_threads(None, env={"LOCAL_WORLD_SIZE": "4"}, cores=8)       # torchrun without OMP_NUM_THREADS
    assert threads == 2 and "4 processes" in why
    assert choose_threads(None, env={"LOCAL_WORLD_SIZE": "4"}, cores=2)[0] == 1
    assert available_cores() >= 1


def test_a_run_states_and_applies_its_threads(tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = train.main(["--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--decoder-depth", "1",
                           "--decoder-num-heads", "2", "--steps", "1", "--no-probe", "--workers", "0",
                           "--threads", "2", "--out", str(tmp_path / "run")])
    assert code == 0
    assert "threads: 2 intra-op CPU thread(s) per process (--threads)" in err.getvalue().splitlines()
    assert torch.get_num_threads() == 2
