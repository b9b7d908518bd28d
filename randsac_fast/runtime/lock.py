"""One run per directory: rank 0 holds a lock on ``<out>/.lock`` for the whole run.

The lock is an ``flock`` on that file, so the kernel drops it the moment the holding process dies,
SIGKILL included: a leftover ``.lock`` file never blocks a later run (it only records the last
holder: host, pid, start time, for the error message). On a file system without ``flock``
(some NFS / Lustre mounts answer ENOLCK or EOPNOTSUPP) the lock is the exclusive creation of
``<out>/.lock.held``, refreshed every :data:`HEARTBEAT_S` seconds by a daemon thread; it is stale,
and taken over, when its holder is a dead pid on this host, or when its heartbeat is older than
:data:`STALE_AFTER_S` (a holder on another host). The file is removed on release.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time

__all__ = ["RunLocked", "RunLock", "lock_run_dir", "release_all", "releasing_locks", "HEARTBEAT_S", "STALE_AFTER_S"]

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_held: list["RunLock"] = []


class RunLocked(ValueError):
    """Another live run uses this directory."""


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _describe(path: str) -> str:
    try:
        with open(path) as fh:
            h = json.load(fh)
        return f"pid {h['pid']} on {h['host']}, since {h['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, out_dir: str):
        self.out = out_dir
        self.path = os.path.join(out_dir, ".lock")
        self.held_path = self.path + ".held"
        self._fd: int | None = None
        self._fallback = False
        self._stop = threading.Event()

    def _message(self, who: str) -> str:
        return (f"--out {self.out} is in use by another run ({who}); wait for it to finish, stop it, "
                "or choose another --out")

    def acquire(self, name_holder: bool = True) -> "RunLock":
        """Take the lock or raise RunLocked naming the holder. ``name_holder=False`` leaves the
        file's bytes as they are until :meth:`name_holder` (a claim that may still be refused)."""
        os.makedirs(self.out, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLocked(self._message(_describe(self.path))) from None
            if e.errno not in _UNSUPPORTED:
                raise
            return self._acquire_fallback()
        self._fd = fd
        _held.append(self)
        if name_holder:
            self.name_holder()
        return self

    def name_holder(self) -> None:
        """Record this process (host, pid, start) in the lock file, for another run's error message."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(_holder()).encode(), 0)

    def _stale(self) -> bool:
        try:
            with open(self.held_path) as fh:
                h = json.load(fh)
            age = time.time() - os.path.getmtime(self.held_path)
        except FileNotFoundError:
            return True
        except (OSError, ValueError):
            return time.time() - os.path.getmtime(self.held_path) > STALE_AFTER_S
        if h.get("host") == socket.gethostname():
            return not _alive(int(h.get("pid", -1)))
        return age > STALE_AFTER_S

    def _acquire_fallback(self) -> "RunLock":
        for _ in range(2):   # at most one stale-lock takeover
            try:
                fd = os.open(self.held_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not self._stale():
                    raise RunLocked(self._message(_describe(self.held_path))) from None
                try:
                    os.unlink(self.held_path)   # a dead holder's lock
                except FileNotFoundError:
                    pass
                continue
            os.write(fd, json.dumps(_holder()).encode())
            os.close(fd)
            self._fallback = True
            threading.Thread(target=self._heartbeat, daemon=True, name="run-lock-heartbeat").start()
            _held.append(self)
            return self
        raise RunLocked(self._message(_describe(self.held_path)))

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.held_path)
            except OSError:
                pass

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._fallback:
            self._stop.set()
            try:
                os.unlink(self.held_path)
            except FileNotFoundError:
                pass
            self._fallback = False
        if self in _held:
            _held.remove(self)


def lock_run_dir(out_dir: str, is_main: bool, command: str | None = None, force: bool = False) -> RunLock | None:
    """Collective: rank 0 takes the lock; every rank raises the same RunLocked if it is held.
    With ``command``, rank 0 also claims the directory for it (``randsac_fast.outputs.claim_dir``): a
    directory holding another command's files is refused, on every rank, before anything is written."""
    import torch.distributed as dist
    from ..outputs import OutputRefused, check_dir, claim_dir, disk_message
    from . import collectives
    lock, error = None, None
    if is_main:
        try:
            if command is not None and not os.path.exists(os.path.join(out_dir, ".lock")):
                check_dir(out_dir, command, force=force)    # before a lock file is created there
            lock = RunLock(out_dir).acquire(name_holder=False)   # a live run's lock is named first
            if command is not None:
                claim_dir(out_dir, command, force=force)    # again, now under the lock
            lock.name_holder()                              # only now is anything written there
        except (RunLocked, OutputRefused) as e:
            error = str(e)
        except OSError as e:   # e.g. --out is a file, or read-only, or the disk is full
            error = f"--out {out_dir}: cannot be used as a run directory ({disk_message(e, out_dir)})"
        if error and lock is not None:
            lock.release()
            lock = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        error = collectives.broadcast_object(error)
    if error:
        raise RunLocked(error)
    return lock


def releasing_locks(fn):
    """Decorate a run: the locks it took are released when it returns or raises (those held before
    stay), so a program may call it again on the same directory."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = list(_held)
        try:
            return fn(*args, **kwargs)
        finally:
            for lock in list(_held):
                if lock not in before:
                    lock.release()
    return wrapper


def release_all() -> None:
    """Release every lock this process holds (the end of a run, or a failed start)."""
    for lock in list(_held):
        lock.release()
