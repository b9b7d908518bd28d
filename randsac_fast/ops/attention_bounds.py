"""Segment bounds: everything an attention call needs from an order, built once per forward.

The order is the same for every layer, so the per-query key-prefix lengths are computed once from
the split and handed to every attention call — FlexAttention's ``BlockMask`` idea, but O(N) int32
and a single batched search:

    kv_len[i]  = #{j : seg_k[j] <= seg_q[i]} (inclusive) or < (strict); 0 for a padded query
                 (seg_q[i] >= SENTINEL), so padding costs no attention work and counts no pairs.
    q_start[j] = the first query that sees key j (queries that see j are a suffix of the real
                 queries); Nq for a key no real query sees. Only the backward needs it.

``causal=True`` declares that ``kv_len[i] == i + 1`` for every query (one token per segment:
SAIM's content stream, and — top-left aligned on keys shifted by the cls — its query stream).
Then no search is needed at all, and a backend may use a plain causal kernel
(SDPA ``is_causal=True``) with no mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..orders import SENTINEL


class _Derived:
    """Masks derived from one forward's bounds, built on first use. Not a dict (nor a dataclass):
    FSDP2's mixed-precision input cast rebuilds dataclass arguments with ``dataclasses.replace``
    and copies dicts, but passes other objects through, so every block's copy of the bounds
    shares this one cache. (No ``__init__``: a compiled forward builds it through
    :func:`_derived`, which dynamo traces; a class with its own ``__init__`` it refuses.)"""

    values: dict


def _derived() -> _Derived:
    d = _Derived()
    d.values = {}
    return d


@dataclass(frozen=True)
class SegmentBounds:
    """seg_q [B, Nq], seg_k [B, Nk] int32 (sorted rows), kv_len [B, Nq] int32, q_start [B, Nk] int32."""

    seg_q: Tensor
    seg_k: Tensor
    kv_len: Tensor
    q_start: Tensor
    inclusive: bool
    causal: bool = False
    derived: _Derived = field(default_factory=_derived, compare=False, repr=False)   # see _Derived

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, Nq, Nk)."""
        return (*self.seg_q.shape, self.seg_k.shape[1])

    def visible_pairs(self) -> Tensor:
        """[B] number of visible (query, key) pairs (padded queries count none)."""
        return self.kv_len.sum(dim=1, dtype=torch.int64)

    def mask(self) -> Tensor:
        """[B, Nq, Nk] bool: key j visible to query i iff j < kv_len[i] (the same prefixes as the kernels)."""
        return torch.arange(self.seg_k.shape[1], device=self.kv_len.device) < self.kv_len[..., None]

    def dense(self) -> tuple[Tensor, Tensor]:
        """(attn_mask [B, 1, Nq, Nk] bool, seen [B, 1, Nq, 1] bool) for a dense-mask kernel (SDPA):
        rows that see no key attend to every key (no NaN) and are zeroed after by ``seen``. Built on
        first use and kept, so every layer of a forward shares one mask (the bounds live one forward;
        a plain dict in a plain object, so a compiled forward traces the caching too)."""
        cache = self.derived.values
        if "dense" not in cache:
            seen = (self.kv_len > 0)[:, None, :, None]
            cache["dense"] = (self.mask()[:, None] | ~seen, seen)
        return cache["dense"]


def query_starts(kv_len: Tensor, num_keys: int) -> Tensor:
    """q_start [B, Nk] int32 from kv_len [B, Nq]: the first query that sees key j, Nq if none does.

    The queries that see any key form one run [lead, end) (rows before it see nothing — the first
    segment under a strict mask —, rows after it are padding), and kv_len is non-decreasing on
    it, so q_start[j] = lead + #{i in the run : kv_len[i] <= j}: one scatter + cumsum, no search.
    """
    b, nq = kv_len.shape
    sees = kv_len > 0
    count = torch.zeros(b, num_keys + 1, dtype=torch.int32, device=kv_len.device)
    count.scatter_add_(1, kv_len.long(), sees.to(torch.int32))           # count[m] = #{i : kv_len[i] == m > 0}
    lead = (sees.cumsum(1) == 0).sum(1, keepdim=True, dtype=torch.int32)
    q_start = lead + count[:, :num_keys].cumsum(1, dtype=torch.int32)
    end = lead + sees.sum(1, keepdim=True, dtype=torch.int32)
    return torch.where(q_start < end, q_start, torch.full_like(q_start, nq))


def segment_bounds(seg_q: Tensor, seg_k: Tensor, inclusive: bool, causal: bool = False) -> SegmentBounds:
    """Bounds of one attention pattern (see the module docstring); seg rows must be sorted.

    seg_q: [B, Nq], seg_k: [B, Nk] int32. ``causal``: the caller declares kv_len[i] = i + 1
    (one token per segment); the declaration is checked when the input checks are on.
    """
    from ._dispatch import checks_enabled
    b, nq = seg_q.shape
    nk = seg_k.shape[1]
    if causal:
        if nk < nq:
            raise ValueError(f"causal bounds need at least as many keys as queries; got Nq={nq}, Nk={nk}")
        # contiguous: kernels index kv_len[b, i] as a dense [B, Nq] array (an expand has batch stride 0)
        kv_len = torch.arange(1, nq + 1, dtype=torch.int32, device=seg_q.device).expand(b, nq).contiguous()
        if checks_enabled(None):
            found = torch.searchsorted(seg_k.contiguous(), seg_q.contiguous(), right=inclusive, out_int32=True)
            if not torch.equal(found, kv_len):
                raise ValueError("causal=True was declared but the seg ids are not one token per segment "
                                 "(kv_len[i] != i + 1); build the bounds with causal=False")
    else:
        kv_len = torch.searchsorted(seg_k.contiguous(), seg_q.contiguous(), right=inclusive, out_int32=True)
        kv_len = torch.where(seg_q >= SENTINEL, torch.zeros_like(kv_len), kv_len)
    return SegmentBounds(seg_q, seg_k, kv_len, query_starts(kv_len, nk), bool(inclusive), bool(causal))
