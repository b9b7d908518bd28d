"""Intra-op CPU threads: set from the cores this process may use, as torchrun would set them.

torch starts with one intra-op thread per core it sees, which on a shared or container-limited
machine can be many more than the process may run (an affinity mask, a cgroup CPU quota): the
threads then wait on each other and a CPU step gets many times slower. torchrun sets
``OMP_NUM_THREADS=1`` for several local processes; a plain ``python -m`` run gets nothing. This
sets the thread count once at start-up, the same way for both, and says what it chose:

1. ``--threads N`` when given;
2. else ``OMP_NUM_THREADS`` when set (torchrun's, or the user's);
3. else the cores available to this process (affinity mask, capped by a cgroup quota) divided
   among the processes of this node (``LOCAL_WORLD_SIZE``).
"""
from __future__ import annotations

import math
import os

import torch

__all__ = ["available_cores", "choose_threads", "set_threads"]


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup CPU quota (v2 ``cpu.max``, v1 ``cfs_quota_us``), or None."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as fq, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as fp:
            quota, period = int(fq.read()), int(fp.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """Cores this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else max(1, cores)


def choose_threads(requested: int | None = None, env: dict | None = None, cores: int | None = None) -> tuple[int, str]:
    """(intra-op threads, where the number comes from) — see the module docstring for the order."""
    env = os.environ if env is None else env
    if requested is not None:
        return requested, "--threads"
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    cores = available_cores() if cores is None else cores
    local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cores // local), (f"{cores} cores available / {local} processes on this node" if local > 1
                                    else f"{cores} cores available to this process")


def set_threads(requested: int | None = None) -> str:
    """Set torch's intra-op threads; return the start-up line that states the choice."""
    threads, why = choose_threads(requested)
    torch.set_num_threads(threads)
    how = "" if why == "--threads" else "; --threads N sets it"
    return f"threads: {threads} intra-op CPU thread(s) per process ({why}{how})"
