"""Preemption: SIGTERM / SIGINT / SIGUSR1 finish the step, save, exit with code 75; a repeat exits at once.
Delivered as clusters deliver them: to the PID, to the whole process group (loader workers included),
to every process of a torchrun job."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from randsac_fast.data.loader import IgnoreStopSignals
from randsac_fast.runtime import preempt
from randsac_fast.runtime.preempt import EXIT_PREEMPTED, STOP_SIGNALS, Preemption

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


# ---- loader workers leave shutdown to the training process -------------------------------------------
def test_worker_init_ignores_the_stop_signals_then_runs_the_given_init(monkeypatch):
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    calls = []
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)   # as a freshly started worker inherits it
        IgnoreStopSignals(calls.append)(3)
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in STOP_SIGNALS)
        assert not set(STOP_SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert calls == [3]
        assert set(STOP_SIGNALS) == {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


# ---- one process, a 2-worker loader: the signal to the PID or to the whole process group -------------
# accum 10 on a batch of 20: a step takes 10 micro-batches, more than the 2 workers hold prefetched (8),
# so the step the signal lands in needs the workers alive to finish.
LOADED = [*TINY, "--batch-size", "20", "--accum", "10", "--workers", "2", "--log-every", "1", "--keep", "1"]


def _start(args, ranks, out):
    return subprocess.Popen(_cmd([*args, "--out", str(out)], ranks), cwd=ROOT_DIR, env=_env(),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stopped(err, signame, out, steps):
    """The one 'stopped by' line -> the step; checks its checkpoint."""
    stopped = [l for l in err.splitlines() if l.startswith(f"stopped by {signame} after step ")]
    assert len(stopped) == 1, err[-3000:]
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    assert 2 <= step < steps, "the run finished before the signal arrived"
    ckpt = out / "checkpoints" / f"step_{step:08d}"
    assert stopped[0].endswith(f"checkpoint {ckpt} written; continue with --resume latest (exit code 75)")
    assert json.loads((ckpt / "meta.json").read_text())["step"] == step
    return step


@pytest.mark.parametrize("sig, to_group, resume", [
    (signal.SIGTERM, True, True),     # timeout, Slurm's scancel and preemption: the whole group
    (signal.SIGTERM, False, False),   # kill PID
    (signal.SIGINT, True, False),     # Ctrl-C in a terminal: the foreground group
    (signal.SIGUSR1, True, False),    # Slurm's early warning (--signal=USR1@60): stop like SIGTERM
])
def test_a_signal_to_the_pid_or_the_group_saves_and_exits_75(tmp_path, sig, to_group, resume):
    steps, out = 12, tmp_path / "run"
    args = [*LOADED, "--steps", str(steps)]
    proc = _start(args, 1, out)
    try:
        _wait_for_step(out / "metrics.jsonl", 2, proc)
        (os.killpg if to_group else os.kill)(proc.pid, sig)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    name = signal.Signals(sig).name
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "DataLoader worker" not in err and "Traceback" not in err, err[-3000:]
    assert err.count(f"{name} received") == 1, err[-3000:]          # the loader workers stay silent
    assert f"{name} received: finishing this step, then saving a checkpoint and exiting with code 75" in err
    step = _stopped(err, name, out, steps)
    if resume:
        r = _run([*args, "--out", str(out), "--resume", "latest"], ranks=1)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"resumed from {out / 'checkpoints' / f'step_{step:08d}'} at step {step}" in r.stderr
        assert sorted(step_losses(out)) == list(range(1, steps + 1))


# ---- torchrun: every process of the job is signalled (Slurm), or only the agent (timeout torchrun ...) ---
@pytest.mark.parametrize("sig, every_process", [
    (signal.SIGTERM, True),    # Slurm: every process of the step; torchrun forwards its copy again
    (signal.SIGUSR1, False),   # the agent alone, told to handle USR1: it forwards it to each rank's group
])
def test_a_signal_to_a_torchrun_job_stops_every_rank_with_a_checkpoint(tmp_path, sig, every_process):
    steps, out = 12, tmp_path / "run"
    args = [*LOADED, "--batch-size", "40", "--steps", str(steps)]
    cmd = _cmd([*args, "--out", str(out)])
    cmd[3:3] = ["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]   # after -m torch.distributed.run
    proc = subprocess.Popen(cmd, cwd=ROOT_DIR, env=_env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(out / "metrics.jsonl", 2, proc)
        ranks = _workers(proc.pid)
        assert len(ranks) == 2
        # torchrun starts each rank in a session of its own: the agent's group holds the agent only, each
        # rank's group holds the rank and its loader workers.
        for pgid in [proc.pid, *ranks] if every_process else [proc.pid]:
            os.killpg(pgid, sig)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    name = signal.Signals(sig).name
    # Each rank announces the signal once (a forwarded copy falls within the repeat window) ...
    for rank in (0, 1):
        assert err.count(f"rank {rank}: {name} received") == 1, err[-3000:]
    assert "DataLoader worker" not in err and "forcefully exiting" not in err, err[-3000:]
    step = _stopped(err, name, out, steps)
    # ... and exits 75; torchrun itself, signalled, re-raises the signal as an exception once its workers
    # are gone: it exits 1 whatever they returned (examples/slurm/ decides on a requeue without it).
    assert proc.returncode == 1 and "SignalException" in err, err[-3000:]
    if every_process:
        r = _run([*args, "--out", str(out), "--resume", "latest"])
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"at step {step}" in r.stderr
        assert sorted(step_losses(out)) == list(range(1, steps + 1))


# ---- two torchrun agents ("nodes") on this machine, c10d rendezvous on the loopback ---------------------
def test_two_node_torchrun_on_the_loopback_trains_and_checkpoints(tmp_path):
    import socket
    with socket.socket() as s:                     # a free port for the rendezvous store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    env = dict(_env(), GLOO_SOCKET_IFNAME="lo")
    agents = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
               "--rdzv-conf", f"is_host={int(node == 0)}", "--local-addr", "127.0.0.1",
               "-m", "randsac_fast.train", *TINY, "--steps", "4", "--ckpt-every", "2", "--keep", "5",
               "--log-every", "1", "--workers", "1", "--out", str(out)]
        agents.append(subprocess.Popen(cmd, cwd=ROOT_DIR, env=env, start_new_session=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        errs = [a.communicate(timeout=240)[1] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
    assert [a.returncode for a in agents] == [0, 0], "\n".join(e[-2000:] for e in errs)
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002", "step_00000004"]
    assert sorted(step_losses(out)) == [1, 2, 3, 4]
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 4


ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
