"""Segment orders: the one contract every part of randsac_fast speaks.

A :class:`SegmentOrder` says, for a batch of images tokenised into a grid of N patches, in which
order the tokens are serialised (``perm``) and which segment each position belongs to (``seg``).
Every attention mask follows from ``seg`` alone (see :mod:`randsac_fast.reference`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SegmentOrder", "sample"]


@dataclass(frozen=True)
class SegmentOrder:
    """perm: [B, N] int64 raster token indices (row * grid_w + col) in serialisation order.
    seg:  [B, N] int32 segment rank of the token at each position of ``perm``; non-decreasing
          along the sequence, starting at 0.
    """

    perm: Tensor
    seg: Tensor

    @property
    def batch(self) -> int:
        return self.perm.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.perm.shape[1]

    @property
    def device(self) -> torch.device:
        return self.perm.device

    def to(self, device) -> "SegmentOrder":
        return SegmentOrder(self.perm.to(device, non_blocking=True), self.seg.to(device, non_blocking=True))

    def num_segments(self) -> Tensor:
        """[B] number of segments of each sample."""
        return self.seg[:, -1].long() + 1

    def ranks(self) -> Tensor:
        """[B, N] segment rank of each token in *raster* order (the inverse view of ``seg``)."""
        out = torch.empty_like(self.seg)
        return out.scatter_(1, self.perm, self.seg)

    @staticmethod
    def from_perm(perm: Tensor, seg: Tensor | None = None) -> "SegmentOrder":
        """Build and validate an order from explicit values; ``seg`` defaults to one token per segment."""
        perm = torch.as_tensor(perm)
        if perm.dim() == 1:
            perm = perm[None]
        if perm.dim() != 2:
            raise ValueError(f"perm must be [B, N]; got shape {tuple(perm.shape)}")
        if perm.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"perm must hold integer token indices; got {perm.dtype}")
        perm = perm.long()
        b, n = perm.shape
        if seg is None:
            seg = torch.arange(n, dtype=torch.int32, device=perm.device).expand(b, n).contiguous()
        else:
            seg = torch.as_tensor(seg, device=perm.device)
            if seg.dim() == 1:
                seg = seg[None].expand(b, -1)
            if seg.is_floating_point():
                raise TypeError(f"seg must hold integer segment ranks; got {seg.dtype}")
            seg = seg.to(torch.int32).contiguous()
        order = SegmentOrder(perm, seg)
        order.validate()
        return order

    def validate(self) -> None:
        """Raise ValueError unless perm is a permutation per row and seg is sorted, compact, from 0."""
        perm, seg = self.perm, self.seg
        if perm.shape != seg.shape:
            raise ValueError(f"perm {tuple(perm.shape)} and seg {tuple(seg.shape)} must have the same shape")
        b, n = perm.shape
        if n == 0:
            raise ValueError("an order needs at least one token")
        ref = torch.arange(n, device=perm.device).expand(b, n)
        if not torch.equal(perm.sort(dim=1).values, ref):
            raise ValueError(f"perm rows must be permutations of 0..{n - 1}; got e.g. {perm[0, :16].tolist()}")
        if bool((seg[:, 0] != 0).any()):
            raise ValueError(f"seg must start at 0 in every row; got first values {seg[:, 0].tolist()[:8]}")
        steps = seg[:, 1:] - seg[:, :-1]
        if bool(((steps < 0) | (steps > 1)).any()):
            raise ValueError("seg must be non-decreasing with steps of 0 or 1 (compact ranks from 0); "
                             f"got e.g. {seg[0, :16].tolist()}")


def sample(spec: str, batch: int, grid, *, generator: torch.Generator | None = None, device=None) -> SegmentOrder:
    """Placeholder: replaced by the full sampler set."""
    raise NotImplementedError
