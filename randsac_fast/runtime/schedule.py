"""Learning-rate schedule: per-iteration linear warmup, then cosine decay to ``min_lr``.

The schedule is a pure function of the optimizer step, so resuming needs only the step count.
Hand-written on purpose: torch's LambdaLR / timm's CosineLRScheduler would add scheduler state to
every checkpoint (and timm a CUDA torch build) for the same ten lines.
"""
from __future__ import annotations

import math

__all__ = ["scaled_lr", "lr_at", "set_lr"]


def scaled_lr(blr: float, effective_batch: int) -> float:
    """The linear scaling rule (Goyal et al.): lr = blr * effective batch / 256."""
    return blr * effective_batch / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """lr for optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup rises linearly from peak/warmup to peak over the first ``warmup_steps`` steps (the first
    update is not wasted at lr 0); then half a cosine from peak to ``min_lr`` over the rest.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
