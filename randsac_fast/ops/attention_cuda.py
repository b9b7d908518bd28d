"""``segment_attention`` backend ``cuda``: the compiled kernels (``csrc/``) as a torch op.

The forward and backward are two ``torch.library.custom_op``s (``randsac_fast::segment_attn_cuda_fwd``
and ``randsac_fast::segment_attn_cuda_bwd``) with fake implementations and a registered autograd
formula, so ``torch.compile(fullgraph=True)`` and FSDP2 see one ordinary op with known output
shapes. The backward is deterministic (no atomics).

The models' fused layouts (:func:`fused_attention_cuda`: qkv [B, N, 3*H*D], or q [B, Nq, H*D] with
kv [B, Nk, 2*H*D]; output [B, Nq, H*D]) have their own op pair (``segment_attn_cuda_fused_fwd`` /
``_bwd``): the kernels read the projections and write the output and the projections' gradients in
place by strides, with no per-head copies.

Contract: see :mod:`randsac_fast.ops.attention` (inputs arrive validated). Limits of this backend:
CUDA tensors, fp16 / bf16, head dims 32, 64, 128, a GPU of compute capability 8.0 or newer.
Importing this module raises ImportError (with how to build it) when the extension is missing.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

# First, before registering anything: a failed import must leave no half-registered op behind.
from ..kernels import cuda_ext

_C = cuda_ext.load()

from ._dispatch import BackendUnavailable  # noqa: E402

HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16)


def check_inputs(q: Tensor, head_dim: int | None = None) -> None:
    """What this backend adds to the shared validation: device, dtype and head dim (``q.shape[-1]``
    unless given: the fused layouts pack the heads into the last dim)."""
    head_dim = q.shape[-1] if head_dim is None else head_dim
    if q.dtype not in DTYPES:
        raise TypeError(f"segment_attention backend 'cuda' takes fp16 or bf16; got {q.dtype} — cast q, k, v "
                        f"(e.g. under torch.autocast) or use backend='triton' or 'sdpa'")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"segment_attention backend 'cuda' takes head dims {HEAD_DIMS}; got {head_dim} — "
                         f"use backend='triton' or 'sdpa'")
    if q.device.type != "cuda" and not (EMULATED and q.device.type == "cpu"):
        raise BackendUnavailable(f"segment_attention backend 'cuda' runs on CUDA tensors; got {q.device} — "
                                 f"use backend='sdpa' on CPU")


#: The extension's kernels run on the CPU emulation (csrc/emu/, a test build): CPU tensors, no stream.
EMULATED = bool(getattr(_C, "EMULATED", False))


def _stream(device: torch.device) -> int:
    return 0 if device.type == "cpu" else torch.cuda.current_stream(device).cuda_stream


def _on_device(t: Tensor):
    """Make t's CUDA device current (nothing to do for the emulation's CPU tensors)."""
    return contextlib.nullcontext() if t.device.type == "cpu" else torch.cuda.device(t.device)


@torch.library.custom_op("randsac_fast::segment_attn_cuda_fwd", mutates_args=())
def _fwd(q: Tensor, k: Tensor, v: Tensor, seg_q: Tensor, seg_k: Tensor, inclusive: bool,
         scale: float) -> tuple[Tensor, Tensor]:
    """-> o [B, H, Nq, D] (q's dtype), lse [B, H, Nq] fp32 (+inf on rows that see no key)."""
    with _on_device(q):
        out, lse = _C.forward(q, k, v, seg_q, seg_k, inclusive, scale, _stream(q.device))
    return out, lse


@_fwd.register_fake
def _fwd_fake(q, k, v, seg_q, seg_k, inclusive, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("randsac_fast::segment_attn_cuda_bwd", mutates_args=())
def _bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, seg_q: Tensor, seg_k: Tensor,
         inclusive: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv shaped like q, k, v (contiguous)."""
    with _on_device(q):
        dq, dk, dv = _C.backward(do, q, k, v, o, lse, seg_q, seg_k, inclusive, scale, _stream(q.device))
    return dq, dk, dv


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


def segment_attention_cuda(q: Tensor, k: Tensor, v: Tensor, seg_q: Tensor, seg_k: Tensor,
                           inclusive: bool, scale: float) -> Tensor:
    """Compiled segment attention: q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D] (see module doc)."""
    check_inputs(q)
    return _fwd(q, k, v, seg_q.contiguous(), seg_k.contiguous(), bool(inclusive), float(scale))[0]


# ----------------------------------------------------------------------------------------------
# The fused projection layouts
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("randsac_fast::segment_attn_cuda_fused_fwd", mutates_args=())
def _fused_fwd(q_src: Tensor, kv_src: Tensor | None, seg_q: Tensor, seg_k: Tensor, heads: int, inclusive: bool,
               scale: float) -> tuple[Tensor, Tensor]:
    """-> o [B, Nq, H*D] (q's dtype), lse [B, H, Nq] fp32 (+inf on rows that see no key)."""
    with _on_device(q_src):
        out, lse = _C.forward_fused(q_src, kv_src, seg_q, seg_k, heads, inclusive, scale, _stream(q_src.device))
    return out, lse


@_fused_fwd.register_fake
def _fused_fwd_fake(q_src, kv_src, seg_q, seg_k, heads, inclusive, scale):
    b, nq, width = q_src.shape
    out_width = width if kv_src is not None else width // 3
    return q_src.new_empty(b, nq, out_width), q_src.new_empty(b, heads, nq, dtype=torch.float32)


@torch.library.custom_op("randsac_fast::segment_attn_cuda_fused_bwd", mutates_args=())
def _fused_bwd(do: Tensor, q_src: Tensor, kv_src: Tensor | None, o: Tensor, lse: Tensor, seg_q: Tensor,
               seg_k: Tensor, heads: int, inclusive: bool, scale: float) -> tuple[Tensor, Tensor]:
    """-> gradients of q_src and kv_src in their layouts (the second empty for self-attention)."""
    with _on_device(q_src):
        dq_src, dkv_src = _C.backward_fused(do, q_src, kv_src, o, lse, seg_q, seg_k, heads, inclusive, scale,
                                            _stream(q_src.device))
    return dq_src, dkv_src


@_fused_bwd.register_fake
def _fused_bwd_fake(do, q_src, kv_src, o, lse, seg_q, seg_k, heads, inclusive, scale):
    return q_src.new_empty(q_src.shape), (kv_src.new_empty(kv_src.shape) if kv_src is not None
                                          else q_src.new_empty(0))


def _fused_setup_context(ctx, inputs, output):
    q_src, kv_src, seg_q, seg_k, heads, inclusive, scale = inputs
    o, lse = output
    ctx.cross = kv_src is not None
    ctx.save_for_backward(q_src, kv_src if ctx.cross else None, o, lse, seg_q, seg_k)
    ctx.heads, ctx.inclusive, ctx.scale = heads, inclusive, scale
    ctx.mark_non_differentiable(lse)


def _fused_backward(ctx, do, _dlse):
    q_src, kv_src, o, lse, seg_q, seg_k = ctx.saved_tensors
    dq_src, dkv_src = _fused_bwd(do, q_src, kv_src, o, lse, seg_q, seg_k, ctx.heads, ctx.inclusive, ctx.scale)
    return dq_src, (dkv_src if ctx.cross else None), None, None, None, None, None


_fused_fwd.register_autograd(_fused_backward, setup_context=_fused_setup_context)


def fused_attention_cuda(q_src: Tensor, kv_src: Tensor | None, bounds, num_heads: int, scale: float) -> Tensor:
    """Self-attention from qkv [B, N, 3*H*D] (kv_src None) or cross-attention from q [B, Nq, H*D] and
    kv [B, Nk, 2*H*D] -> [B, Nq, H*D]; ``bounds``: a SegmentBounds (seg_q, seg_k, inclusive). The
    projections are read by strides: only their last dim must be contiguous."""
    parts = 3 if kv_src is None else 1
    check_inputs(q_src, q_src.shape[-1] // parts // num_heads)
    q_src = q_src if q_src.stride(-1) == 1 else q_src.contiguous()
    if kv_src is not None and kv_src.stride(-1) != 1:
        kv_src = kv_src.contiguous()
    return _fused_fwd(q_src, kv_src, bounds.seg_q.contiguous(), bounds.seg_k.contiguous(), int(num_heads),
                      bool(bounds.inclusive), float(scale))[0]
