"""``segment_attention`` backend ``xformers``: memory-efficient attention with a tensor bias (a peer).

The segment mask becomes an additive bias (0 visible, -inf hidden), materialised per batch as a
[B, 1, Nq, Nk] tensor and broadcast over heads — exactly the O(N^2) memory traffic the fused
kernels avoid, which is what the benchmark compares. A query that sees no key gets its row
unmasked (so the softmax stays finite) and its output set to 0, hence zero gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference

try:
    import xformers.ops as xops
except ImportError as e:
    raise ImportError(f"segment_attention backend 'xformers' needs the xformers package ({e}); install it "
                      f"with `pip install xformers` (matching your torch build) or pick backend='sdpa'") from e


def segment_bias(seg_q: Tensor, seg_k: Tensor, inclusive: bool, heads: int,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Additive bias [B, H, Nq, Nk] (an expanded view) and ``seen`` [B, Nq, 1, 1] bool."""
    mask = reference.visibility(seg_q, seg_k, inclusive)              # [B, Nq, Nk]
    seen = mask.any(dim=-1, keepdim=True)                             # [B, Nq, 1]
    batch, n_q, n_k = mask.shape
    # The CUTLASS kernels want the bias rows 16-byte aligned: allocate a padded last dim, slice it.
    padded = torch.empty(batch, 1, n_q, -(-n_k // 8) * 8, dtype=dtype, device=seg_q.device)
    bias = padded[..., :n_k]
    bias.zero_().masked_fill_(~(mask | ~seen)[:, None], float("-inf"))
    return bias.expand(batch, heads, n_q, n_k), seen[..., None]


def segment_attention_xformers(q: Tensor, k: Tensor, v: Tensor, seg_q: Tensor, seg_k: Tensor,
                               inclusive: bool, scale: float) -> Tensor:
    """q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D]; contract in :mod:`randsac_fast.ops.attention`."""
    bias, seen = segment_bias(seg_q, seg_k, inclusive, q.shape[1], q.dtype)
    k, v = reference.hide_unseen_keys(k, v, seg_q, seg_k, inclusive)  # padding may hold NaN / Inf
    # xformers takes [B, M, H, K]: a transposed view, no copy (the last dim stays contiguous).
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=bias, scale=scale)      # [B, Nq, H, D]
    out = torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.transpose(1, 2)
