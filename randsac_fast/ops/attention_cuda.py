"""``segment_attention`` backend ``cuda``: the compiled kernels (``csrc/``) as a torch op.

The forward and backward are two ``torch.library.custom_op``s (``randsac_fast::segment_attn_cuda_fwd``
and ``randsac_fast::segment_attn_cuda_bwd``) with fake implementations and a registered autograd
formula, so ``torch.compile(fullgraph=True)`` and FSDP2 see one ordinary op with known output
shapes. The backward is deterministic (no atomics).

Contract: see :mod:`randsac_fast.ops.attention` (inputs arrive validated). Limits of this backend:
CUDA tensors, fp16 / bf16, head dims 32, 64, 128, a GPU of compute capability 8.0 or newer.
Importing this module raises ImportError (with how to build it) when the extension is missing.
"""
from __future__ import annotations

import torch
from torch import Tensor

# First, before registering anything: a failed import must leave no half-registered op behind.
from ..kernels import cuda_ext

_C = cuda_ext.load()

from ._dispatch import BackendUnavailable  # noqa: E402

HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16)


def check_inputs(q: Tensor) -> None:
    """What this backend adds to the shared validation: device, dtype and head dim."""
    if q.dtype not in DTYPES:
        raise TypeError(f"segment_attention backend 'cuda' takes fp16 or bf16; got {q.dtype} — cast q, k, v "
                        f"(e.g. under torch.autocast) or use backend='triton' or 'sdpa'")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"segment_attention backend 'cuda' takes head dims {HEAD_DIMS}; got {q.shape[-1]} — "
                         f"use backend='triton' or 'sdpa'")
    if q.device.type != "cuda":
        raise BackendUnavailable(f"segment_attention backend 'cuda' runs on CUDA tensors; got {q.device} — "
                                 f"use backend='sdpa' on CPU")


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@torch.library.custom_op("randsac_fast::segment_attn_cuda_fwd", mutates_args=())
def _fwd(q: Tensor, k: Tensor, v: Tensor, seg_q: Tensor, seg_k: Tensor, inclusive: bool,
         scale: float) -> tuple[Tensor, Tensor]:
    """-> o [B, H, Nq, D] (q's dtype), lse [B, H, Nq] fp32 (+inf on rows that see no key)."""
    with torch.cuda.device(q.device):
        out, lse = _C.forward(q, k, v, seg_q, seg_k, inclusive, scale, _stream(q.device))
    return out, lse


@_fwd.register_fake
def _fwd_fake(q, k, v, seg_q, seg_k, inclusive, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("randsac_fast::segment_attn_cuda_bwd", mutates_args=())
def _bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, seg_q: Tensor, seg_k: Tensor,
         inclusive: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv shaped like q, k, v (contiguous)."""
    with torch.cuda.device(q.device):
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
