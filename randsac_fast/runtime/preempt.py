"""Preemption: SIGTERM (what Slurm and Kubernetes send before a kill), SIGINT (Ctrl-C) and SIGUSR1
(Slurm's early warning, ``--signal=USR1@SECONDS``) stop a run cleanly: every rank finishes the step
it is in, the ranks agree to stop after the same step, a checkpoint is written, and the process
exits with :data:`EXIT_PREEMPTED`. USR1 stops too rather than saving and going on: the job ends
within seconds anyway, and torchrun (when told to handle USR1) shuts its workers down with it.

- The training process owns shutdown: DataLoader workers ignore these signals
  (``data/loader.py``), so a signal sent to the whole process group, or to every process of a job,
  reaches the workers without killing them, and each process announces it once.

- The handler only records the signal (and writes one line with ``os.write``, which is safe in a
  handler); the decision is taken between steps by :meth:`Preemption.requested`, one all-reduce
  (MAX) of a flag on a CPU (gloo) group, so every rank stops after the same step even when only
  one of them was signalled.
- A second signal at least :data:`REPEAT_WINDOW_S` after the first exits at once, without saving,
  with code ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM). Signals closer together are
  one request: Slurm signals torchrun *and* its workers, and torchrun forwards the signal again.
- torchrun gives workers ``--shutdown-timeout`` seconds (default 30) after forwarding a signal
  before it kills them; raise it when a checkpoint takes longer to write.
"""
from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

from . import collectives

__all__ = ["EXIT_PREEMPTED", "REPEAT_WINDOW_S", "STOP_SIGNALS", "Preempted", "Preemption"]

EXIT_PREEMPTED = 75          # EX_TEMPFAIL: stopped on request with a checkpoint; run it again to go on
REPEAT_WINDOW_S = 2.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by the trainer after the checkpoint of a requested stop is written."""

    def __init__(self, signame: str, step: int, checkpoint: str | None):
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        where = (f"checkpoint {checkpoint} written; continue with --resume latest" if checkpoint
                 else "no checkpoint written")
        super().__init__(f"stopped by {signame} after step {step}: {where} (exit code {EXIT_PREEMPTED})")


class Preemption:
    """Context manager installing the SIGTERM / SIGINT / SIGUSR1 handlers for the training loop.

    ``last_good``: a callable naming the last good checkpoint, for the line a second signal prints.
    """

    def __init__(self, rank: int = 0, world: int = 1, last_good=lambda: None,
                 signals=STOP_SIGNALS):
        self.rank, self.world, self.last_good, self.signals = rank, world, last_good, signals
        self.signum: int | None = None
        self._first = 0.0
        self._previous: dict = {}
        self._group = None
        if world > 1 and dist.get_backend() != "gloo":   # the vote stays on the CPU: no device sync
            self._group = dist.new_group(backend="gloo")

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _say(self, text: str) -> None:
        prefix = f"rank {self.rank}: " if self.world > 1 else ""
        os.write(2, f"{prefix}{text}\n".encode())

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first = signum, now
            self._say(f"{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
                      f"and exiting with code {EXIT_PREEMPTED} (send it again to exit at once without saving)")
        elif now - self._first >= REPEAT_WINDOW_S:
            last = self.last_good()
            self._say(f"second {signal.Signals(signum).name}: exiting now without saving "
                      + (f"(the last good checkpoint is {last})" if last else "(no checkpoint was written)"))
            os._exit(128 + signum)

    def requested(self) -> bool:
        """Collective (every rank, after every step): has any rank been signalled?"""
        flag = torch.tensor([0 if self.signum is None else int(self.signum)], dtype=torch.int32)
        if self.world > 1:
            flag = collectives.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)   # CPU: gloo
        if flag.item() and self.signum is None:   # another rank was signalled: stop for its reason
            self.signum, self._first = int(flag.item()), time.monotonic()
        return bool(flag.item())

    def __enter__(self) -> "Preemption":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is Preempted:   # stay in charge while the process exits: a repeat still exits at once
            return
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()
