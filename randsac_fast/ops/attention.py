"""``segment_attention``: block-causal attention whose mask is given by sorted segment ids.

Contract (shared by every backend):

* q: [B, H, Nq, D], k, v: [B, H, Nk, D]; any strides with a contiguous last dim (views of a
  fused qkv projection are fine); fp16 / bf16 / fp32 (fp64 for the reference and sdpa backends).
* seg_q: [B, Nq], seg_k: [B, Nk], int32, each row non-decreasing. Key j is visible to query i
  iff ``seg_k[j] <= seg_q[i]`` (``inclusive=True``) or ``seg_k[j] < seg_q[i]`` (strict). Because
  the rows are sorted, the visible keys of a query are a prefix of the key sequence.
* Padding: keys whose seg id is larger than every real query's (a sentinel) are invisible, and a
  key no query sees may hold anything (NaN / Inf): it changes no output and gets zero gradient.
  With the data checks on (``ops.set_checks``), non-finite q, or k / v at a seen key, is refused.
* A query that sees no key (strict mask, first segment) gets output 0 and zero gradient.
* Returns [B, H, Nq, D] in q's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from . import _validate, cases
from ._dispatch import checks_enabled, lazy, register, resolve

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _reference(q, k, v, seg_q, seg_k, inclusive, scale):
    return reference.segment_attention(q, k, v, seg_q, seg_k, inclusive=inclusive, scale=scale)


def _sdpa(q, k, v, seg_q, seg_k, inclusive, scale):
    """torch SDPA with a boolean mask built on the fly from the seg ids (the portable fallback)."""
    mask = reference.visibility(seg_q, seg_k, inclusive)[:, None]     # [B, 1, Nq, Nk]
    # Rows that see nothing: unmask them so SDPA stays finite, then zero their output. Their
    # output gradient is then zero, so they add nothing to dq, dk or dv.
    seen = mask.any(dim=-1, keepdim=True)                              # [B, 1, Nq, 1]
    k, v = reference.hide_unseen_keys(k, v, seg_q, seg_k, inclusive)  # padding may hold NaN / Inf
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~seen, scale=scale)
    return torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))


_TABLE = {
    "reference": lambda: _reference,
    "sdpa": lambda: _sdpa,
    "flex": lazy("ops.attention_flex", "segment_attention_flex"),
    "xformers": lazy("ops.attention_xformers", "segment_attention_xformers"),
    "triton": lazy("ops.attention_triton", "segment_attention_triton"),
    "cuda": lazy("ops.attention_cuda", "segment_attention_cuda"),
}
register("segment_attention", _TABLE, fast=("triton", "cuda"), fallback=("sdpa",), check=cases.attention_check, timing=cases.attention_timing,
         trusted=("reference", "sdpa"))


def check_seg(seg: Tensor, name: str, batch: int, length: int, device, check_sorted: bool | None) -> None:
    """Validate one seg-id tensor (shape, dtype, device, and — when checks are on — sortedness)."""
    if not isinstance(seg, Tensor):
        raise TypeError(f"{name} must be a tensor; got {type(seg).__name__}")
    if seg.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 segment ids; got {seg.dtype} — pass {name}.to(torch.int32)")
    if tuple(seg.shape) != (batch, length):
        raise ValueError(f"{name} must have shape (B, N) = ({batch}, {length}); got {tuple(seg.shape)}")
    if seg.device != device:
        raise ValueError(f"{name} is on {seg.device} but q is on {device}; move both to one device")
    if length > 1 and checks_enabled(check_sorted) and bool((seg[:, 1:] < seg[:, :-1]).any()):
        b = int((seg[:, 1:] < seg[:, :-1]).any(dim=1).nonzero()[0])
        raise ValueError(f"{name} must be non-decreasing along the sequence (segment order); row {b} is "
                         f"not: {seg[b, :16].tolist()}... — build orders with randsac_fast.orders")


def validate(q: Tensor, k: Tensor, v: Tensor, seg_q: Tensor, seg_k: Tensor, scale,
             check_sorted: bool | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, N, D]; got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.dtype not in _FLOAT:
            raise TypeError(f"{name} must be fp16, bf16, fp32 or fp64; got {t.dtype}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1); got strides {t.stride()} "
                             f"— call .contiguous() on it")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    B, H, Nq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k and v must be [B, H, Nk, D] = [{B}, {H}, Nk, {D}] like q; got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    check_seg(seg_q, "seg_q", B, Nq, q.device, check_sorted)
    check_seg(seg_k, "seg_k", B, k.shape[2], q.device, check_sorted)


def segment_attention(q: Tensor, k: Tensor, v: Tensor, seg_q: Tensor, seg_k: Tensor, *,
                      inclusive: bool, scale: float | None = None, backend: str = "auto",
                      check_sorted: bool | None = None) -> Tensor:
    """Segment-causal attention (see the module docstring for the contract).

    backend: ``auto`` (on CUDA tensors the fastest of triton, cuda and sdpa that passed its one-time
    self-check on this device; sdpa elsewhere — see :mod:`randsac_fast.ops.selfcheck`), ``reference``,
    ``sdpa``, ``flex``, ``xformers``, ``triton``, ``cuda``. ``check_sorted`` overrides the global
    switch (:func:`randsac_fast.ops.set_checks`) for the one sync-costing check.
    """
    validate(q, k, v, seg_q, seg_k, scale, check_sorted)
    inclusive, scale = _validate.attention_args(q, k, v, seg_q, seg_k, inclusive, scale, check_sorted)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    layout = "contiguous" if q.is_contiguous() and k.is_contiguous() and v.is_contiguous() else "strided"
    fn = resolve("segment_attention", backend, _TABLE, q.device,
                 dtype=q.dtype, structure=(q.shape[-1], bool(inclusive), layout),
                 shape=(q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    return fn(q, k, v, seg_q, seg_k, bool(inclusive), float(scale))


def visible_pairs(seg_q: Tensor, seg_k: Tensor, inclusive: bool) -> Tensor:
    """[B] number of visible (query, key) pairs, from sorted seg ids in O(N log N) — no mask.

    Query i sees the key prefix of length ``searchsorted(seg_k, seg_q[i], right=inclusive)``.
    """
    kv_len = torch.searchsorted(seg_k.contiguous(), seg_q.contiguous(), right=inclusive)
    return kv_len.sum(dim=1)
