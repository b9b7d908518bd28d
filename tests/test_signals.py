"""Preemption: SIGTERM / SIGINT finish the step, save, exit with code 75; a repeat exits at once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from randsac_fast.runtime import preempt
from randsac_fast.runtime.preempt import EXIT_PREEMPTED, Preemption

from helpers import step_losses
from test_train_distributed import TINY, _cmd, _env, _run


# ---- the handler, in this process ------------------------------------------------------------------
def test_signal_is_recorded_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with Preemption() as p:
        assert not p.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)                               # let the interpreter run the handler
        assert p.requested() and p.signame == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)           # a repeat within the window: the same request
        time.sleep(0.05)
        assert p.requested()
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_signal_after_the_window_exits_at_once(monkeypatch, capfd):
    exits = []
    monkeypatch.setattr(preempt.os, "_exit", exits.append)
    monkeypatch.setattr(preempt, "REPEAT_WINDOW_S", 0.0)
    with Preemption(last_good=lambda: "runs/x/checkpoints/step_00000004"):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert exits == []
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    assert exits == [128 + signal.SIGINT]
    err = capfd.readouterr().err
    assert ("SIGINT received: finishing this step, then saving a checkpoint and exiting with code 75 (send it "
            "again to exit at once without saving)") in err
    assert "second SIGINT: exiting now without saving (the last good checkpoint is runs/x/checkpoints/step_00000004)" in err


# ---- a real 2-rank torchrun run ----------------------------------------------------------------------
def _wait_for_step(path, step, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and any(json.loads(l)["step"] >= step for l in path.read_text().splitlines() if l):
            return
        time.sleep(0.02)
    raise AssertionError("the run ended or hung before it got going")


def _workers(agent_pid):
    out = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def test_sigterm_to_one_rank_of_a_two_rank_run_saves_a_whole_step_and_resume_continues(tmp_path):
    # accum 2: the signal lands between micro-batches or in one; the checkpoint must still hold whole steps.
    args = [*TINY, "--data", "synthetic", "--synthetic-size", "256", "--batch-size", "8", "--accum", "2",
            "--steps", "14", "--log-every", "1", "--keep", "1"]
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cmd([*args, "--out", str(cut)]), cwd=ROOT_DIR, env=_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(cut / "metrics.jsonl", 2, proc)
        # Only rank 1 is signalled (say, its node is being drained): both ranks must agree to stop.
        os.kill(_workers(proc.pid)[-1], signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped = [l for l in err.splitlines() if l.startswith("stopped by SIGTERM after step ")]
    assert len(stopped) == 1, err[-3000:]
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    assert 2 <= step < 14, "the run finished before the signal arrived"
    ckpt = cut / "checkpoints" / f"step_{step:08d}"
    assert stopped[0] == (f"stopped by SIGTERM after step {step}: checkpoint {ckpt} written; continue with "
                          f"--resume latest (exit code {EXIT_PREEMPTED})")
    assert "rank 1: SIGTERM received: finishing this step" in err and "rank 0: SIGTERM received" not in err
    assert f"(exitcode: {EXIT_PREEMPTED})" in err          # torchrun's report of the workers' exit code
    assert sorted(os.listdir(cut / "checkpoints")) == [ckpt.name]
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == step and meta["micro"] == 2 * step   # whole steps: every micro-batch of each
    assert max(step_losses(cut)) == step                     # the step it stopped after was logged too

    r = _run([*args, "--out", str(cut), "--resume", "latest"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ckpt} at step {step}" in r.stderr
    assert sorted(step_losses(cut)) == list(range(1, 15))
    assert sorted(os.listdir(cut / "checkpoints")) == ["step_00000014"]   # the same branch, continued


ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
