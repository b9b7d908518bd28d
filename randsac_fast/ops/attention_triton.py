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
from . import autotune as _autotune

_kernels.TILE_CHOOSER = _autotune.choose_tile       # a sweep (RANDSAC_FAST_TILES=sweep) times tiles here


def _check_runnable(q: Tensor, head_dim: int | None = None) -> None:
    """Device, dtype and head dim (``head_dim``: default q's last dim, the per-head layout)."""
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
    head_dim = q.shape[-1] if head_dim is None else head_dim
    if head_dim > _kernels.MAX_HEAD_DIM:
        raise ValueError(f"segment_attention backend 'triton' takes head dims up to {_kernels.MAX_HEAD_DIM}; "
                         f"got {head_dim} — use backend='sdpa' or split the heads")


@torch.library.custom_op("randsac_fast::segment_attn_fwd", mutates_args=())
def _fwd(q: Tensor, k: Tensor, v: Tensor, seg_q: Tensor, seg_k: Tensor, inclusive: bool,
         scale: float) -> tuple[Tensor, Tensor]:
    """-> o [B, H, Nq, D] (q's dtype), lse [B, H, Nq] fp32."""
    return _kernels.forward(q, k, v, _kernels.kv_lengths(seg_q, seg_k, inclusive), scale)


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
    ctx.set_materialize_grads(False)      # nobody uses lse's gradient: do not zero-fill one


def _backward(ctx, do, _dlse):
    if do is None:
        return None, None, None, None, None, None, None
    q, k, v, o, lse, seg_q, seg_k = ctx.saved_tensors
    dq, dk, dv = _bwd(do, q, k, v, o, lse, seg_q, seg_k, ctx.inclusive, ctx.scale)
    return dq, dk, dv, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def segment_attention_triton(q: Tensor, k: Tensor, v: Tensor, seg_q: Tensor, seg_k: Tensor,
                             inclusive: bool, scale: float) -> Tensor:
    """Fused segment attention: q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D] (see module doc)."""
    _check_runnable(q)
    return _fwd(q, k, v, seg_q, seg_k, bool(inclusive), float(scale))[0]


# ----------------------------------------------------------------------------------------------
# The fused-projection layout: q, k, v read in place from the [B, N, 3*H*D] qkv projection (or a
# [B, Nq, H*D] q and a [B, Nk, 2*H*D] kv projection for cross-attention), output written as
# [B, Nq, H*D], gradients written into one buffer per input. Bounds come precomputed
# (SegmentBounds, once per forward). The kernels take the strided head views as they are.
# ----------------------------------------------------------------------------------------------
def heads(x: Tensor, parts: int, num_heads: int) -> list[Tensor]:
    """[B, N, parts*H*D] -> parts views [B, H, N, D] (no copy; last dim contiguous)."""
    b, n, _ = x.shape
    x = x.view(b, n, parts, num_heads, -1)
    return [x[:, :, i].transpose(1, 2) for i in range(parts)]


def _fused_forward(q_src: Tensor, kv_src: Tensor | None, kv_len: Tensor, num_heads: int, scale: float):
    q, k, v = heads(q_src, 3, num_heads) if kv_src is None else heads(q_src, 1, num_heads) + heads(kv_src, 2, num_heads)
    b, h, nq, d = q.shape
    o = q_src.new_empty(b, nq, h * d)
    _, lse = _kernels.forward(q, k, v, kv_len, scale, o=heads(o, 1, num_heads)[0])
    return o, lse


def _fused_backward(do, q_src, kv_src, o, lse, kv_len, q_start, num_heads, scale):
    q, k, v = heads(q_src, 3, num_heads) if kv_src is None else heads(q_src, 1, num_heads) + heads(kv_src, 2, num_heads)
    d_src = torch.empty_like(q_src, memory_format=torch.contiguous_format)
    d_kv = None if kv_src is None else torch.empty_like(kv_src, memory_format=torch.contiguous_format)
    grads = heads(d_src, 3, num_heads) if d_kv is None else heads(d_src, 1, num_heads) + heads(d_kv, 2, num_heads)
    do = heads(do.contiguous(), 1, num_heads)[0]
    _kernels.backward(do, q, k, v, heads(o, 1, num_heads)[0], lse, kv_len, q_start, scale, grads=grads)
    return d_src, d_kv


@torch.library.custom_op("randsac_fast::segment_attn_qkv_fwd", mutates_args=())
def _qkv_fwd(qkv: Tensor, kv_len: Tensor, num_heads: int, scale: float) -> tuple[Tensor, Tensor]:
    """qkv [B, N, 3*H*D] -> o [B, N, H*D], lse [B, H, N] fp32."""
    return _fused_forward(qkv, None, kv_len, num_heads, scale)


@_qkv_fwd.register_fake
def _qkv_fwd_fake(qkv, kv_len, num_heads, scale):
    b, n, c = qkv.shape
    return qkv.new_empty(b, n, c // 3), qkv.new_empty(b, num_heads, n, dtype=torch.float32)


@torch.library.custom_op("randsac_fast::segment_attn_qkv_bwd", mutates_args=())
def _qkv_bwd(do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor, kv_len: Tensor, q_start: Tensor, num_heads: int,
             scale: float) -> Tensor:
    """-> dqkv [B, N, 3*H*D]: one buffer, no per-part zero-fill and add."""
    return _fused_backward(do, qkv, None, o, lse, kv_len, q_start, num_heads, scale)[0]


@_qkv_bwd.register_fake
def _qkv_bwd_fake(do, qkv, o, lse, kv_len, q_start, num_heads, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


@torch.library.custom_op("randsac_fast::segment_attn_cross_fwd", mutates_args=())
def _cross_fwd(q: Tensor, kv: Tensor, kv_len: Tensor, num_heads: int, scale: float) -> tuple[Tensor, Tensor]:
    """q [B, Nq, H*D], kv [B, Nk, 2*H*D] -> o [B, Nq, H*D], lse [B, H, Nq] fp32."""
    return _fused_forward(q, kv, kv_len, num_heads, scale)


@_cross_fwd.register_fake
def _cross_fwd_fake(q, kv, kv_len, num_heads, scale):
    b, n, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(b, num_heads, n, dtype=torch.float32)


@torch.library.custom_op("randsac_fast::segment_attn_cross_bwd", mutates_args=())
def _cross_bwd(do: Tensor, q: Tensor, kv: Tensor, o: Tensor, lse: Tensor, kv_len: Tensor, q_start: Tensor,
               num_heads: int, scale: float) -> tuple[Tensor, Tensor]:
    """-> dq [B, Nq, H*D], dkv [B, Nk, 2*H*D]."""
    return _fused_backward(do, q, kv, o, lse, kv_len, q_start, num_heads, scale)


@_cross_bwd.register_fake
def _cross_bwd_fake(do, q, kv, o, lse, kv_len, q_start, num_heads, scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(kv, memory_format=torch.contiguous_format))


class _FusedSelf(torch.autograd.Function):
    """Autograd of the qkv-layout self-attention: the forward and backward ops above; the
    gradient of lse is never materialised (nobody uses it)."""

    @staticmethod
    def forward(ctx, qkv, kv_len, q_start, num_heads, scale):
        o, lse = _qkv_fwd(qkv, kv_len, num_heads, scale)
        ctx.save_for_backward(qkv, o, lse, kv_len, q_start)
        ctx.num_heads, ctx.scale = num_heads, scale
        ctx.set_materialize_grads(False)
        return o

    @staticmethod
    def backward(ctx, do):
        if do is None:
            return None, None, None, None, None
        qkv, o, lse, kv_len, q_start = ctx.saved_tensors
        return _qkv_bwd(do, qkv, o, lse, kv_len, q_start, ctx.num_heads, ctx.scale), None, None, None, None


class _FusedCross(torch.autograd.Function):
    """Autograd of the q / kv-layout cross-attention."""

    @staticmethod
    def forward(ctx, q, kv, kv_len, q_start, num_heads, scale):
        o, lse = _cross_fwd(q, kv, kv_len, num_heads, scale)
        ctx.save_for_backward(q, kv, o, lse, kv_len, q_start)
        ctx.num_heads, ctx.scale = num_heads, scale
        ctx.set_materialize_grads(False)
        return o

    @staticmethod
    def backward(ctx, do):
        if do is None:
            return None, None, None, None, None, None
        q, kv, o, lse, kv_len, q_start = ctx.saved_tensors
        dq, dkv = _cross_bwd(do, q, kv, o, lse, kv_len, q_start, ctx.num_heads, ctx.scale)
        return dq, dkv, None, None, None, None


def fused_attention_triton(q_src: Tensor, kv_src: Tensor | None, bounds, num_heads: int, scale: float) -> Tensor:
    """Self-attention from qkv [B, N, 3*H*D] (kv_src None) or cross-attention from q [B, Nq, H*D] and
    kv [B, Nk, 2*H*D] -> [B, Nq, H*D]; ``bounds``: a SegmentBounds (kv_len, q_start)."""
    _check_runnable(q_src, q_src.shape[-1] // (3 if kv_src is None else 1) // num_heads)
    if kv_src is None:
        return _FusedSelf.apply(q_src.contiguous(), bounds.kv_len.contiguous(), bounds.q_start.contiguous(),
                                num_heads, float(scale))
    return _FusedCross.apply(q_src.contiguous(), kv_src.contiguous(), bounds.kv_len.contiguous(),
                             bounds.q_start.contiguous(), num_heads,
                             float(scale))
