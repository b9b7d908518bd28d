"""``segment_attention`` backend ``flex``: FlexAttention with a per-batch BlockMask (a peer).

The mask_mod reads the seg ids, so FlexAttention classifies blocks itself; the price is a
BlockMask build per batch (the orders change every step), which :func:`segment_block_mask`
exposes so that benchmarks can time attention with and without it. A query that sees no key gets
output 0 (FlexAttention's rule for fully masked rows), hence zero gradient.

On CUDA the attention call is compiled (FlexAttention's fast path); elsewhere it runs eagerly,
forward only (FlexAttention has no CPU backward).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import reference

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError as e:  # torch < 2.5
    raise ImportError(f"segment_attention backend 'flex' needs torch >= 2.5 with FlexAttention ({e})") from e


def segment_mask_mod(seg_q: Tensor, seg_k: Tensor, inclusive: bool):
    """FlexAttention mask_mod: key j visible to query i iff seg_k[j] <= seg_q[i] (< if strict)."""
    if inclusive:
        def mask_mod(b, h, q_idx, kv_idx):
            return seg_k[b, kv_idx] <= seg_q[b, q_idx]
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return seg_k[b, kv_idx] < seg_q[b, q_idx]
    return mask_mod


def segment_block_mask(seg_q: Tensor, seg_k: Tensor, inclusive: bool, block_size: int = 128) -> BlockMask:
    """Per-batch BlockMask (shared by all heads) from seg_q [B, Nq], seg_k [B, Nk]."""
    batch, n_q = seg_q.shape
    return create_block_mask(segment_mask_mod(seg_q, seg_k, inclusive), batch, None, n_q, seg_k.shape[1],
                             device=seg_q.device, BLOCK_SIZE=block_size)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex_segment_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float) -> Tensor:
    """Attention with a prebuilt mask (the timed part when the mask build is excluded)."""
    fn = _compiled_flex() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=block_mask, scale=scale)


def segment_attention_flex(q: Tensor, k: Tensor, v: Tensor, seg_q: Tensor, seg_k: Tensor,
                           inclusive: bool, scale: float) -> Tensor:
    """q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D]; contract in :mod:`randsac_fast.ops.attention`."""
    if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError("segment_attention backend 'flex' has no backward on CPU (FlexAttention "
                                  "limitation); use backend='sdpa' or run under torch.no_grad()")
    k, v = reference.hide_unseen_keys(k, v, seg_q, seg_k, inclusive)  # padding may hold NaN / Inf
    return flex_segment_attention(q, k, v, segment_block_mask(seg_q, seg_k, inclusive), scale)
