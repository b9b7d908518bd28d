"""Shared test helpers: random segment ids and the FlashAttention-style tolerance rule."""
from __future__ import annotations

import torch

from randsac_fast.ops import selfcheck


def random_seg(batch: int, n: int, max_segments: int, generator: torch.Generator) -> torch.Tensor:
    """[B, N] int32 sorted, compact segment ids starting at 0 with a random number of segments."""
    rows = []
    for _ in range(batch):
        k = int(torch.randint(1, max_segments + 1, (1,), generator=generator))
        cuts = torch.randperm(max(n - 1, 0), generator=generator)[: k - 1] + 1
        starts = torch.zeros(n, dtype=torch.int32)
        starts[cuts] = 1
        starts[0] = 0
        rows.append(torch.cumsum(starts, 0).to(torch.int32))
    return torch.stack(rows)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return selfcheck.max_err(a, b)


def assert_close_by_rule(fast: torch.Tensor, plain: torch.Tensor, ref64: torch.Tensor, *, factor: float = 3.0,
                         floor: float = 1e-6, what: str = "") -> None:
    """FlashAttention rule (the package's one copy, :func:`randsac_fast.ops.selfcheck.close_by_rule`):
    |fast - ref64| <= factor * |plain - ref64| + floor, ``plain`` = plain PyTorch in fast's dtype."""
    assert torch.isfinite(fast).all(), f"{what}: non-finite values"
    ok, e_fast, e_plain = selfcheck.close_by_rule(fast, plain, ref64, factor=factor, floor=floor)
    assert ok, f"{what}: error {e_fast:.3e} > {factor} x plain {e_plain:.3e} + {floor}"


def tiny_model_and_optimizer():
    """A two-layer model after one AdamW step (so the optimizer has state), seeded."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def step_losses(out_dir) -> dict[int, float]:
    """Per-step losses from a run's metrics.jsonl; a re-run step keeps its last record."""
    import json
    import os
    losses = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        for line in fh:
            rec = json.loads(line)
            losses[rec["step"]] = rec["loss"]
    return losses
