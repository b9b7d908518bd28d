"""Learning-rate schedule: per-iteration linear warmup, then cosine decay to ``min_lr``.

The schedule is a pure function of the optimizer step, so resuming needs only the step count.
Hand-written on purpose: torch's LambdaLR / timm's CosineLRScheduler would add scheduler state to
every checkpoint (and timm a CUDA torch build) for the same ten lines.
"""
from __future__ import annotations

import math

__all__ = ["scaled_lr", "lr_at", "set_lr", "fit_warmup"]


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


def fit_warmup(warmup: int, total: int, how: str) -> tuple[int, str | None]:
    """(warm-up steps to use, a warning line or None) for a run of ``total`` optimizer steps.

    A warm-up longer than half the run is scaled to a tenth of it, with a warning: presets and
    defaults size the warm-up for the full schedule (10 of 1600 epochs, 20 of 1500 steps), so a
    short try-out would otherwise end at, or never reach, the peak lr and learn little — silently.
    Scaling rather than refusing keeps a try-out a one-liner and keeps the schedule's shape (rise,
    then cosine decay); the line names the flag that sets it. ``how``: where the warm-up came from,
    e.g. ``"--warmup-epochs 10"``.
    """
    if warmup <= total // 2:
        return warmup, None
    fitted = total // 10
    return fitted, (f"warning: a warm-up of {warmup} steps ({how}) is longer than half of this {total}-step run; "
                    f"using {fitted} step{'' if fitted == 1 else 's'} (a tenth of the run) — set the warm-up or the run's length to choose")
