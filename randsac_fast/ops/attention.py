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
from ..orders import SENTINEL
from . import _validate, cases
from ._dispatch import auto_order, checks_enabled, lazy, register, resolve
from .attention_bounds import SegmentBounds, segment_bounds

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
    "sdpa_causal": lambda: _sdpa,     # the per-head API has no causal declaration: the masked path
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
        _validate.with_data(t, name)
        if t.shape[-1] < 1:
            raise ValueError(f"{name} has head dim D = 0 (shape {tuple(t.shape)}); D must be >= 1 — check "
                             "embed_dim / num_heads")
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


# ----------------------------------------------------------------------------------------------
# The fused-projection layout with precomputed bounds: what the models call.
# ----------------------------------------------------------------------------------------------
def _heads(x: Tensor, parts: int, num_heads: int) -> list[Tensor]:
    """[B, N, parts*H*D] -> parts views [B, H, N, D] (no copy; last dim contiguous). One ``unbind``
    (not ``parts`` selects), so the backward writes the parts' gradients with one stack instead of a
    zero-filled buffer plus a copy per part."""
    b, n, _ = x.shape
    return [t.transpose(1, 2) for t in x.view(b, n, parts, num_heads, -1).unbind(2)]


def _qkv_views(q_src: Tensor, kv_src: Tensor | None, num_heads: int) -> list[Tensor]:
    if kv_src is None:
        return _heads(q_src, 3, num_heads)
    return _heads(q_src, 1, num_heads) + _heads(kv_src, 2, num_heads)


def _merge(out: Tensor) -> Tensor:
    """[B, H, N, D] -> [B, N, H*D]."""
    b, _, n, _ = out.shape
    return out.transpose(1, 2).reshape(b, n, -1)


def _fused_sdpa(q_src, kv_src, bounds: SegmentBounds, num_heads, scale):
    """SDPA with the prefix mask of the bounds (padded rows see nothing, output 0)."""
    q, k, v = _qkv_views(q_src, kv_src, num_heads)
    mask, seen = bounds.dense()                                 # built once per forward, shared by the layers
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return _merge(torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device)))


def _fused_sdpa_causal(q_src, kv_src, bounds: SegmentBounds, num_heads, scale):
    """SDPA's causal kernel (``is_causal=True``, top-left aligned, no mask) where the bounds are
    declared causal (one token per segment); the masked SDPA path otherwise."""
    if not bounds.causal:
        return _fused_sdpa(q_src, kv_src, bounds, num_heads, scale)
    q, k, v = _qkv_views(q_src, kv_src, num_heads)
    return _merge(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))


def _unpadded_seg_q(seg_q: Tensor) -> Tensor:
    """seg_q with padded queries (seg id >= SENTINEL) at -1: they see no key (the fused contract)."""
    return torch.where(seg_q >= SENTINEL, torch.full_like(seg_q, -1), seg_q)


def _fused_reference(q_src, kv_src, bounds: SegmentBounds, num_heads, scale):
    """The dense reference on the head views; padded queries (seg id >= SENTINEL) see nothing."""
    q, k, v = _qkv_views(q_src, kv_src, num_heads)
    return _merge(reference.segment_attention(q, k, v, _unpadded_seg_q(bounds.seg_q), bounds.seg_k,
                                              inclusive=bounds.inclusive, scale=scale))


def _per_head(name: str):
    """Adapter for a backend with only the per-head API (flex, xformers): head views in,
    [B, N, H*D] out (autograd then adds the per-part gradient copies the native fused paths
    (triton, cuda) avoid).

    Padded query rows give exactly 0 and zero gradient, as on the native fused paths: the
    mask-built backends (flex, xformers) see them with seg id -1 (no key visible); the cuda kernels
    take sorted rows only, so there their rows are zeroed after (no gradient flows into them)."""
    masked = name in ("flex", "xformers")
    cache: list = []

    def load():
        if not cache:
            fn = _TABLE[name]()      # BackendUnavailable here (not at the first call): auto moves past it

            def run(q_src, kv_src, bounds: SegmentBounds, num_heads, scale):
                q, k, v = _qkv_views(q_src, kv_src, num_heads)
                seg_q = _unpadded_seg_q(bounds.seg_q) if masked else bounds.seg_q
                out = _merge(fn(q, k, v, seg_q, bounds.seg_k, bounds.inclusive, scale))
                padded = (bounds.seg_q >= SENTINEL)[..., None]                  # [B, Nq, 1]
                return torch.where(padded, torch.zeros((), dtype=out.dtype, device=out.device), out)
            cache.append(run)
        return cache[0]
    return load


_FUSED_TABLE = {
    "reference": lambda: _fused_reference,
    "sdpa": lambda: _fused_sdpa,
    "sdpa_causal": lambda: _fused_sdpa_causal,
    "flex": _per_head("flex"),
    "xformers": _per_head("xformers"),
    "triton": lazy("ops.attention_triton", "fused_attention_triton"),
    "cuda": lazy("ops.attention_cuda", "fused_attention_cuda"),
}
# What the models call: verified and timed like the per-head op (structure: head dim, heads, self /
# cross, inclusive, causal; timing keyed on (B, Nq, Nk)).
register("segment_attention_fused", _FUSED_TABLE, fast=("triton", "cuda"), fallback=("sdpa",),
         check=cases.fused_attention_check, timing=cases.fused_attention_timing,
         trusted=("reference", "sdpa", "sdpa_causal"))


def _resolve_fused(src: Tensor, bounds: SegmentBounds, num_heads: int, head_dim: int, kind: str, backend: str):
    return resolve("segment_attention_fused", backend, _FUSED_TABLE, src.device,
                   auto_order(src.device, ("triton", "cuda"), ("sdpa",)), dtype=src.dtype,
                   structure=(head_dim, int(num_heads), kind, bool(bounds.inclusive), bool(bounds.causal)),
                   shape=bounds.shape)


def _validate_fused(q_src: Tensor, kv_src: Tensor | None, bounds: SegmentBounds, num_heads: int, parts: int) -> int:
    """-> head dim; one clear error for each kind of bad input."""
    if not isinstance(bounds, SegmentBounds):
        raise TypeError(f"bounds must be a SegmentBounds (randsac_fast.ops.segment_bounds); got {type(bounds).__name__}")
    for name, t, want in (("q" if kv_src is not None else "qkv", q_src, parts), ("kv", kv_src, 2)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] % (want * num_heads):
            raise ValueError(f"{name} must be [B, N, {want}*H*D] with H={num_heads}; got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.dtype not in _FLOAT:
            raise TypeError(f"{name} must be fp16, bf16, fp32 or fp64; got {t.dtype}")
    b, nq, nk = bounds.shape
    kv = q_src if kv_src is None else kv_src
    if q_src.shape[:2] != (b, nq) or kv.shape[:2] != (b, nk):
        raise ValueError(f"bounds are for (B, Nq, Nk) = {(b, nq, nk)}; got q rows {tuple(q_src.shape[:2])} "
                         f"and key rows {tuple(kv.shape[:2])} — build the bounds from this split's seg ids")
    if kv_src is not None and kv_src.shape[-1] != 2 * q_src.shape[-1]:
        raise ValueError(f"kv must be twice as wide as q ([B, Nk, 2*H*D]); got {kv_src.shape[-1]} vs {q_src.shape[-1]}")
    return q_src.shape[-1] // parts // num_heads


def segment_attention_qkv(qkv: Tensor, bounds: SegmentBounds, num_heads: int, *, scale: float | None = None,
                          backend: str = "auto") -> Tensor:
    """Segment-causal self-attention straight from a fused projection.

    qkv: [B, N, 3*H*D] (q | k | v, each head-major), bounds: from :func:`segment_bounds` for this
    sequence (Nq = Nk = N) -> [B, N, H*D]. Same visibility rule as :func:`segment_attention`;
    query rows with kv_len 0 (padding, or nothing visible) give 0.
    """
    d = _validate_fused(qkv, None, bounds, num_heads, 3)
    fn = _resolve_fused(qkv, bounds, num_heads, d, "self", backend)
    return fn(qkv, None, bounds, int(num_heads), float(scale if scale is not None else d ** -0.5))


def segment_attention_cross(q: Tensor, kv: Tensor, bounds: SegmentBounds, num_heads: int, *,
                            scale: float | None = None, backend: str = "auto") -> Tensor:
    """Cross-attention from a q projection [B, Nq, H*D] into a kv projection [B, Nk, 2*H*D]
    (k | v) -> [B, Nq, H*D]; bounds from :func:`segment_bounds` (seg_q, seg_k)."""
    d = _validate_fused(q, kv, bounds, num_heads, 1)
    fn = _resolve_fused(q, bounds, num_heads, d, "cross", backend)
    return fn(q, kv, bounds, int(num_heads), float(scale if scale is not None else d ** -0.5))
