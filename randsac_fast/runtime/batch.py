"""Global batch -> per-rank micro-batch and gradient accumulation.

Presets and flags state the *global* batch (images per optimizer step over all processes), as the
papers' numbers read: SAIM's batch 2048 on 8 processes is 256 images per rank, on 16 it is 128. So a
run trains the same at any world size (same images per step, same learning rate by the linear
scaling rule); only how the batch is cut up changes.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BatchPlan", "plan_batch"]


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int   # images per optimizer step, all ranks together
    per_rank: int       # images per rank per micro-batch (one forward/backward)
    accum: int          # micro-batches per optimizer step


def plan_batch(global_batch: int, world: int, accum: int | None = None,
               micro_batch: int | None = None) -> BatchPlan:
    """Split ``global_batch`` over ``world`` ranks and ``accum`` micro-batches.

    ``accum`` None: the fewest micro-batches whose per-rank size is at most ``micro_batch`` (1 when
    ``micro_batch`` is None). The split must be exact — a global batch that does not divide is an
    error naming the fix, never a silently different batch.
    """
    for name, val in (("--batch-size", global_batch), ("--accum", accum), ("--micro-batch", micro_batch)):
        if val is not None and val < 1:
            raise ValueError(f"{name} must be >= 1; got {val}")
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} (--batch-size) is not divisible by the {world} processes; "
                         f"choose --batch-size a multiple of {world} (e.g. {_multiple(global_batch, world)})")
    per_process = global_batch // world
    if accum is None:
        cap = micro_batch or per_process
        accum = next(a for a in range(1, per_process + 1) if per_process % a == 0 and per_process // a <= cap)
    elif micro_batch is not None and per_process // accum > micro_batch:
        raise ValueError(f"--accum {accum} gives {per_process // accum} images per rank, more than "
                         f"--micro-batch {micro_batch}; drop --accum to derive it, or raise --micro-batch")
    if per_process % accum:
        raise ValueError(f"global batch {global_batch} on {world} processes is {per_process} images per rank, "
                         f"not divisible into --accum {accum} micro-batches; choose --batch-size a multiple "
                         f"of {world * accum} (e.g. {_multiple(global_batch, world * accum)})")
    return BatchPlan(global_batch, per_process // accum, accum)


def _multiple(value: int, of: int) -> int:
    """The multiple of ``of`` nearest to ``value`` (at least ``of``)."""
    return max(of, round(value / of) * of)
