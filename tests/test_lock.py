"""One run per directory: a second run gets one clear error; a dead holder never blocks."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from randsac_fast.runtime import lock as lock_mod
from randsac_fast.runtime.lock import RunLock, RunLocked

TINY = ["--embed-dim", "16", "--depth", "1", "--num-heads", "2", "--decoder-depth", "1", "--decoder-num-heads", "2",
        "--batch-size", "16", "--steps", "1", "--probe", "false"]


def test_second_run_on_a_directory_in_use_gets_one_clear_error(tmp_path, capsys):
    from randsac_fast import train
    out = tmp_path / "run"
    held = RunLock(str(out)).acquire()                    # the first run
    (out / "config.json").write_text('{"seed": 0}')
    try:
        assert train.main([*TINY, "--out", str(out), "--seed", "1"]) == 1
    finally:
        held.release()
    err = capsys.readouterr().err
    assert (f"error: --out {out} is in use by another run (pid {os.getpid()} on {socket.gethostname()}, since "
            in err and "wait for it to finish, stop it, or choose another --out" in err and "Traceback" not in err), err
    assert (out / "config.json").read_text() == '{"seed": 0}'          # the first run's config is untouched
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import importlib.util as u, sys, time; "   # lock.py alone: no torch import
         "s = u.spec_from_file_location('lock', sys.argv[1]); m = u.module_from_spec(s); s.loader.exec_module(m); "
         "m.RunLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(600)", lock_mod.__file__, str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"pid {holder.pid} on"):
            RunLock(str(out)).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert os.path.exists(out / ".lock")                 # the dead holder's file is still there ...
    RunLock(str(out)).acquire().release()                # ... and does not block: the kernel dropped the flock


def test_out_that_is_a_file_is_one_clear_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match=f"--out {target}: cannot be used as a run directory"):
        lock_mod.lock_run_dir(str(target), True)


# ---- file systems without flock: an exclusive lock file with pid / heartbeat staleness ------------
@pytest.fixture
def no_flock(monkeypatch):
    def unsupported(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(lock_mod.fcntl, "flock", unsupported)


def _holder_file(out, host, pid, age_s=0.0):
    path = os.path.join(out, ".lock.held")
    with open(path, "w") as fh:
        json.dump({"host": host, "pid": pid, "since": "earlier"}, fh)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_fallback_lock_blocks_a_second_run_and_is_removed_on_release(tmp_path, no_flock):
    out = str(tmp_path)
    first = RunLock(out).acquire()
    with pytest.raises(RunLocked, match=f"pid {os.getpid()} on {socket.gethostname()}"):
        RunLock(out).acquire()
    first.release()
    assert not os.path.exists(os.path.join(out, ".lock.held"))
    RunLock(out).acquire().release()


def test_fallback_lock_staleness(tmp_path, no_flock):
    out = str(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _holder_file(out, socket.gethostname(), dead.pid)                   # a dead pid on this host: stale
    RunLock(out).acquire().release()
    _holder_file(out, "other-host", 12345, age_s=10)                    # another host, fresh heartbeat: held
    with pytest.raises(RunLocked, match="pid 12345 on other-host, since earlier"):
        RunLock(out).acquire()
    _holder_file(out, "other-host", 12345, age_s=lock_mod.STALE_AFTER_S + 60)   # heartbeat too old: stale
    RunLock(out).acquire().release()
