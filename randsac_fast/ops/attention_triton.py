"""``segment_attention`` backend ``triton``: the fused block-sparse kernels, as a torch op.

The forward and backward are two ``torch.library.custom_op``s (``randsac_fast::segment_attn_fwd``
and ``randsac_fast::segment_attn_bwd``) with fake implementations and a registered autograd
formula. ``torch.compile(fullgraph=True)`` and FSDP2 therefore see one ordinary op with known
output shapes; custom_op (rather than triton_op) keeps the op opaque to the compiler, which works
the same from torch 2.6 on and also under the Triton CPU interpreter.

Contract: see :mod:`randsac_fast.ops.attention` (inputs arrive validated). Limits of this backend:
head dim <= 128; CUDA tensors (CPU tensors only under ``TRITON_INTERPRET=1``, for tests).
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    from ..kernels import triton_attention as _kernels
except ImportError as e:  # the loader turns this into BackendUnavailable
    raise ImportError(f"segment_attention backend 'triton' needs the triton package ({e}); "
                      f"install it with `pip install triton` or pick backend='sdpa'") from e

from ._dispatch import BackendUnavailable


def _check_runnable(q: Tensor) -> None:
    if q.device.type == "cpu" and not _kernels.INTERPRET:
        raise BackendUnavailable(
            "segment_attention backend 'triton' got CPU tensors: the kernels run on CUDA tensors, or on CPU "
            "only under the Triton interpreter (set TRITON_INTERPRET=1 before triton is imported; slow, for "
            "tests); on CPU use backend='sdpa'")
    if q.device.type not in ("cpu", "cuda"):
        raise BackendUnavailable(f"segment_attention backend 'triton' runs on CUDA tensors; got {q.device}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"segment_attention backend 'triton' takes fp16, bf16 or fp32; got {q.dtype} — "
                        f"use backend='reference' or 'sdpa' for fp64")
    if q.shape[-1] > _kernels.MAX_HEAD_DIM:
        raise ValueError(f"segment_attention backend 'triton' takes head dims up to {_kernels.MAX_HEAD_DIM}; "
                         f"got {q.shape[-1]} — use backend='sdpa' or split the heads")


@torch.library.custom_op("randsac_fast::segment_attn_fwd", mutates_args=())
def _fwd(q: Tensor, k: Tensor, v: Tensor, seg_q: Tensor, seg_k: Tensor, inclusive: bool,
         scale: float) -> tuple[Tensor, Tensor]:
    """-> o [B, H, Nq, D] (q's dtype), lse [B, H, Nq] fp32."""
    kv_len, _ = _kernels.visible_bounds(seg_q, seg_k, inclusive)
    return _kernels.forward(q, k, v, kv_len, scale)


@_fwd.register_fake
def _fwd_fake(q, k, v, seg_q, seg_k, inclusive, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("randsac_fast::segment_attn_bwd", mutates_args=())
def _bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, seg_q: Tensor, seg_k: Tensor,
         inclusive: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv shaped like q, k, v."""
    kv_len, q_start = _kernels.visible_bounds(seg_q, seg_k, inclusive)
    return _kernels.backward(do, q, k, v, o, lse, kv_len, q_start, scale)


@_bwd.register_fake
def _bwd_fake(do, q, k, v, o, lse, seg_q, seg_k, inclusive, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, seg_q, seg_k, inclusive, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seg_q, seg_k)
    ctx.inclusive, ctx.scale = inclusive, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, seg_q, seg_k = ctx.saved_tensors
    dq, dk, dv = _bwd(do, q, k, v, o, lse, seg_q, seg_k, ctx.inclusive, ctx.scale)
    return dq, dk, dv, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def segment_attention_triton(q: Tensor, k: Tensor, v: Tensor, seg_q: Tensor, seg_k: Tensor,
                             inclusive: bool, scale: float) -> Tensor:
    """Fused segment attention: q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D] (see module doc)."""
    _check_runnable(q)
    return _fwd(q, k, v, seg_q, seg_k, bool(inclusive), float(scale))[0]
