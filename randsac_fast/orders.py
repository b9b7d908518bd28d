"""Segment orders: the one contract every part of randsac_fast speaks, and the samplers for it.

A :class:`SegmentOrder` says, for a batch of images tokenised into a grid of N patches, in which
order the tokens are serialised (``perm``) and which segment each position belongs to (``seg``).
Every attention mask follows from ``seg`` alone (see :mod:`randsac_fast.reference`).

Samplers (:func:`sample`), named by a spec string of segment *counts* as in the RandSAC paper:

* ``raster``           every token its own segment, raster order (iGPT's patch-raster).
* ``random``           every token its own segment, uniformly random order (SAIM, "patch-random").
* ``square:K``         K aligned MxM squares tiling the grid (RandSAC 3.2), in random order.
* ``blob:K``           K blobs from a sampled mixture of Gaussians (RandSAC appendix A.2).
* ``square:16/4``,     hierarchies (RandSAC 3.3): the finest count first, then the number of
  ``blob:11/5``,       partitions the segments are grouped into, and so on for deeper levels.
  ``square:64/16/4``   Partitions come in random order; inside a partition its groups come in
                       random order, recursively.
* ``incoherent:K``     K equal-sized groups of random, spatially incoherent tokens (the paper's
                       segment-coherence ablation), in random order.
* ``prefix``,          prefix-causal (AIM, El-Nouby et al.): the first P tokens of the order form
  ``prefix:raster``,   segment 0 (they see each other, bidirectionally), every later token is its
  ``prefix:random``,   own segment (causal): ``seg = [0]*P + [1, 2, ..., N-P]``. Tokens in raster
  ``prefix:LO-HI``     order (``prefix``, ``prefix:raster``) or a random order (``prefix:random``);
                       P is drawn per image, uniformly from LO..HI (default 1..N-1, as AIM), e.g.
                       ``prefix:raster:4-12``.

Every sampler is one small function that labels each token with its group at every level
(finest first); one shared traversal (:func:`_traverse`) turns those labels into ``perm``/``seg``.
Tokens inside a segment keep raster order among themselves.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["SegmentOrder", "OrderSpec", "OrderLevels", "sample", "sample_levels", "parse_spec",
           "check_fits", "grid_shape", "prefix_range", "VALID_FORMS", "SENTINEL"]

#: seg id of padding positions: larger than any real segment rank, so padded keys are invisible to
#: every real query, and a padded query (seg id >= SENTINEL) sees no key at all (output 0, no cost).
SENTINEL = 2 ** 30

#: The spec forms :func:`parse_spec` accepts (quoted in every spec error).
VALID_FORMS = ("raster | random | square:K[/K2[/K3...]] | blob:K[/K2[/K3...]] | incoherent:K | "
               "prefix[:raster|random][:LO-HI] (K = segment count; each further count groups the level below "
               "into fewer partitions; LO-HI = prefix-length range in tokens)")

#: Appendix A.2: blob means ~ U(-1.75, 1.75), standard deviations ~ U(0.5, 1), per axis, in token
#: coordinates normalised to [-2, 2].
BLOB_MEAN_RANGE = (-1.75, 1.75)
BLOB_STD_RANGE = (0.5, 1.0)
BLOB_EXTENT = 2.0


def _checks_on() -> bool:
    """The ops' check switch (:func:`randsac_fast.ops.set_checks`), read without importing ops
    (ops imports this module); off while compiling."""
    dispatch = sys.modules.get("randsac_fast.ops._dispatch")
    return dispatch.checks_enabled(None) if dispatch is not None else not torch.compiler.is_compiling()


@dataclass(frozen=True)
class SegmentOrder:
    """perm: [B, N] int64 raster token indices (row * grid_w + col) in serialisation order.
    seg:  [B, N] int32 segment rank of the token at each position of ``perm``; non-decreasing
          along the sequence, starting at 0.
    segment_size: host-side knowledge, never read from the device: the number of tokens of every
          segment of every sample when they are all equal (squares: N/K, random/raster: 1), or
          None (blobs, or unknown). It lets a model choose static shapes without a device sync.
    """

    perm: Tensor
    seg: Tensor
    segment_size: int | None = None

    def __post_init__(self):
        """Shapes, dtypes and ``segment_size`` always (free); the values — ``perm`` a permutation
        per row, ``seg`` compact and sorted, ``segment_size`` equal to every segment's size — only
        while the ops' check switch is on (:func:`randsac_fast.ops.set_checks`: a device sync)."""
        for name in ("perm", "seg"):
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"SegmentOrder {name} must be a torch.Tensor [B, N]; got {type(t).__name__} — "
                                "build orders with orders.sample or SegmentOrder.from_perm")
            if t.dim() != 2 or t.is_floating_point() or t.dtype == torch.bool:
                raise ValueError(f"SegmentOrder {name} must be a 2-D integer tensor [B, N]; got {t.dtype} of shape "
                                 f"{tuple(t.shape)} — use SegmentOrder.from_perm to build one from values")
        if self.perm.shape != self.seg.shape:
            raise ValueError(f"SegmentOrder perm {tuple(self.perm.shape)} and seg {tuple(self.seg.shape)} must have "
                             "the same shape")
        n, size = self.perm.shape[1], self.segment_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1 or n % size):
            raise ValueError(f"segment_size must be None or a positive divisor of the {n} tokens; got {size!r}")
        if _checks_on() and self.perm.device.type != "meta":
            self.validate()

    @classmethod
    def _trusted(cls, perm: Tensor, seg: Tensor, segment_size: int | None) -> "SegmentOrder":
        """An order this module built (or moved): no re-validation."""
        order = object.__new__(cls)
        object.__setattr__(order, "perm", perm)
        object.__setattr__(order, "seg", seg)
        object.__setattr__(order, "segment_size", segment_size)
        return order

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
        """On ``device``; host tensors go through pinned memory in a non-blocking copy (no host stall)."""
        return SegmentOrder._trusted(_to_device(self.perm, device), _to_device(self.seg, device), self.segment_size)

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
        order = SegmentOrder._trusted(perm, seg, None)
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
        if self.segment_size is not None:
            want = torch.arange(n, device=seg.device) // self.segment_size
            if not torch.equal(seg.long(), want.expand(b, n)):
                raise ValueError(f"segment_size {self.segment_size} says every segment has {self.segment_size} tokens, "
                                 f"but seg holds other sizes (e.g. {seg[0, :16].tolist()}); pass segment_size=None "
                                 "(sizes unknown) or the true size")


# --------------------------------------------------------------------------------------------
# Specs and grids
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OrderSpec:
    """A parsed order spec. kind: one of raster, random, square, blob, incoherent, prefix;
    counts: group counts per hierarchy level, finest first (empty for raster / random / prefix).
    prefix only: tokens, the token order ("raster" or "random"); prefix_range, the (LO, HI)
    prefix length range in tokens, or None for AIM's 1..N-1."""

    kind: str
    counts: tuple[int, ...] = ()
    tokens: str = ""
    prefix_range: tuple[int, int] | None = None

    def __str__(self) -> str:
        if self.kind == "prefix":
            lo_hi = "" if self.prefix_range is None else ":{}-{}".format(*self.prefix_range)
            return f"prefix:{self.tokens}{lo_hi}"
        return self.kind if not self.counts else f"{self.kind}:" + "/".join(map(str, self.counts))

    @property
    def num_levels(self) -> int:
        return max(1, len(self.counts))

    def segment_size(self, grid) -> int | None:
        """Tokens per segment when every segment has the same size (lets a model trim by
        slicing instead of padding); None for blobs, whose sizes vary."""
        gh, gw = grid_shape(grid)
        if self.kind in ("raster", "random"):
            return 1
        if self.kind in ("blob", "prefix"):
            return None
        return gh * gw // self.counts[0]


_KINDS = ("raster", "random", "square", "blob", "incoherent", "prefix")


def parse_spec(spec) -> OrderSpec:
    """Validate an order spec string early (e.g. a trainer's ``--order``) -> :class:`OrderSpec`."""
    if isinstance(spec, OrderSpec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"an order spec is a string such as 'square:16/4'; got {spec!r}. Valid forms: {VALID_FORMS}")
    kind, sep, rest = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in _KINDS:
        raise ValueError(f"unknown order spec {spec!r}. Valid forms: {VALID_FORMS}")
    if kind in ("raster", "random"):
        if sep:
            raise ValueError(f"order spec {spec!r}: {kind} takes no count (every token is its own "
                             f"segment); write just '{kind}'")
        return OrderSpec(kind)
    if kind == "prefix":
        return _parse_prefix(spec, rest if sep else "")
    if not rest.strip():
        raise ValueError(f"order spec {spec!r}: {kind} needs a segment count, e.g. '{kind}:16'")
    counts = []
    for part in rest.split("/"):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"order spec {spec!r}: segment counts must be positive integers; got {part!r}")
        counts.append(int(part))
    if min(counts) < 2:
        raise ValueError(f"order spec {spec!r}: every count must be at least 2 (one segment or one "
                         f"partition leaves nothing to order)")
    if kind == "incoherent" and len(counts) > 1:
        raise ValueError(f"order spec {spec!r}: incoherent takes one count (it has no hierarchy), "
                         f"e.g. 'incoherent:16'")
    if any(a <= b for a, b in zip(counts, counts[1:])):
        raise ValueError(f"order spec {spec!r}: counts must decrease from segments to partitions "
                         f"(finest first), e.g. '{kind}:16/4'")
    return OrderSpec(kind, tuple(counts))


def _parse_prefix(spec: str, rest: str) -> OrderSpec:
    """prefix[:raster|random][:LO-HI] -> OrderSpec('prefix', tokens=..., prefix_range=...)."""
    tokens, lo_hi = "raster", None
    parts = [part.strip() for part in rest.split(":")] if rest.strip() else []
    if parts and parts[0].lower() in ("raster", "random"):
        tokens = parts.pop(0).lower()
    if parts:
        lo, dash, hi = parts.pop(0).partition("-")
        if not (dash and lo.strip().isdigit() and hi.strip().isdigit()):
            raise ValueError(f"order spec {spec!r}: a prefix-length range is LO-HI in tokens, e.g. "
                             f"'prefix:raster:4-12'")
        lo_hi = (int(lo), int(hi))
        if not 1 <= lo_hi[0] <= lo_hi[1]:
            raise ValueError(f"order spec {spec!r}: the prefix-length range needs 1 <= LO <= HI; got "
                             f"{lo_hi[0]}-{lo_hi[1]}")
    if parts:
        raise ValueError(f"order spec {spec!r}: write prefix, prefix:raster, prefix:random, optionally "
                         f"followed by :LO-HI (e.g. 'prefix:random:1-15')")
    return OrderSpec("prefix", tokens=tokens, prefix_range=lo_hi)


def prefix_range(spec: OrderSpec, num_tokens: int) -> tuple[int, int]:
    """(LO, HI) prefix lengths of a prefix spec on ``num_tokens`` tokens (default 1..N-1)."""
    return spec.prefix_range or (1, num_tokens - 1)


def grid_shape(grid) -> tuple[int, int]:
    """An int (square grid) or (grid_h, grid_w) -> (grid_h, grid_w)."""
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    try:
        gh, gw = (int(g) for g in grid)
        ok = all(int(g) == g and not isinstance(g, bool) for g in grid)
    except (TypeError, ValueError):
        ok = False
    if not ok or gh < 1 or gw < 1:
        raise ValueError(f"grid must be a positive int or a (grid_h, grid_w) pair of positive ints; got {grid!r}")
    return gh, gw


def _square_side(count: int, gh: int, gw: int) -> int | None:
    """Side M of the square tiling with ``count`` squares, or None if no tiling fits."""
    m = math.isqrt(gh * gw // count) if gh * gw % count == 0 else 0
    return m if m > 0 and gh % m == 0 and gw % m == 0 and (gh // m) * (gw // m) == count else None


def _square_error(spec: OrderSpec, count: int, gh: int, gw: int) -> str:
    name = f"square:{count}" + (f" (in {spec})" if len(spec.counts) > 1 else "")
    if gh == gw and math.isqrt(count) ** 2 == count:
        need = f"{name} needs grid sides divisible by {math.isqrt(count)}"
    elif gh == gw:
        need = f"{name} needs a square number of squares on a square grid"
    else:
        need = f"{name} needs a square side M dividing both grid sides with (H/M)*(W/M) = {count}"
    # Squares of side >= 2 only: side 1 is the same as 'random'.
    fits = [gh * gw // m ** 2 for m in range(2, math.gcd(gh, gw) + 1)
            if gh % m == 0 and gw % m == 0 and gh * gw // m ** 2 >= 2]
    hint = (f"square counts that fit: {', '.join(map(str, fits))}" if fits
            else "use blob:K (no square tiling fits this grid)")
    return f"{need}; got {gh}x{gw} — {hint}"


def check_fits(spec, grid) -> OrderSpec:
    """Raise ValueError (what is wrong and what would fit) unless ``spec`` can be sampled on
    ``grid``; returns the parsed spec. Samples nothing."""
    spec = parse_spec(spec)
    gh, gw = grid_shape(grid)
    n = gh * gw
    if spec.kind == "square":
        sides = []
        for count in spec.counts:
            m = _square_side(count, gh, gw)
            if m is None:
                raise ValueError(_square_error(spec, count, gh, gw))
            if sides and m % sides[-1]:
                raise ValueError(f"{spec} on {gh}x{gw}: its {m}x{m} partitions cannot be built from "
                                 f"{sides[-1]}x{sides[-1]} squares (each level's side must be a "
                                 f"multiple of the level below)")
            sides.append(m)
    elif spec.kind == "incoherent" and n % spec.counts[0]:
        divisors = [k for k in range(2, n) if n % k == 0]
        raise ValueError(f"{spec} needs equal groups, so K must divide the {n} tokens of a {gh}x{gw} "
                         f"grid; K that fit: {', '.join(map(str, divisors)) or 'none'}")
    elif spec.kind == "prefix":
        lo, hi = prefix_range(spec, n)
        if n < 2 or hi > n - 1:
            raise ValueError(f"{spec} on a {gh}x{gw} grid: the prefix must leave at least one token to "
                             f"predict, so its length is at most {n - 1}; got up to {hi}"
                             + ("" if n >= 2 else " (use a grid of at least 2 tokens)"))
    elif spec.kind in ("blob", "incoherent") and spec.counts[0] > n:
        raise ValueError(f"{spec} asks for more segments than the {n} tokens of a {gh}x{gw} grid; "
                         f"use a count <= {n}")
    return spec


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OrderLevels:
    """An order plus its hierarchy, for figures and tests. L = number of levels, finest first.

    order:  the :class:`SegmentOrder` (``order.seg == ranks[0]``).
    ranks:  L tensors [B, N] int32: partition rank at each *position* of ``order.perm`` at each
            level (non-decreasing, compact, from 0).
    labels: L tensors [B, N] int64: raw group id of each token in *raster* order at each level,
            before compaction (for blobs: the index of the winning mixture component).
    blobs:  for blob specs, L pairs (means, stds), each [B, K_l, 2] float64 with (x, y) on the
            last axis — the sampled mixtures; None otherwise.
    """

    order: SegmentOrder
    ranks: tuple[Tensor, ...]
    labels: tuple[Tensor, ...]
    blobs: tuple[tuple[Tensor, Tensor], ...] | None = None

    def raster_ranks(self, level: int = 0) -> Tensor:
        """[B, N] partition rank of each token in raster order at ``level`` (0 = segments)."""
        return torch.empty_like(self.ranks[level]).scatter_(1, self.order.perm, self.ranks[level])


def sample(spec, batch: int, grid, *, generator: torch.Generator | None = None, device=None) -> SegmentOrder:
    """Draw ``batch`` independent segment orders for a grid of patches.

    spec: see the module docstring (e.g. 'random', 'square:16/4', 'blob:11/5').
    grid: int (square grid) or (grid_h, grid_w). generator: random numbers are drawn with it on
    its own device (reproducible), and the result is moved to ``device`` (default: that device).
    Returns perm [B, N] int64, seg [B, N] int32.
    """
    return sample_levels(spec, batch, grid, generator=generator, device=device).order


def sample_levels(spec, batch: int, grid, *, generator: torch.Generator | None = None,
                  device=None) -> OrderLevels:
    """:func:`sample` that also returns every hierarchy level (see :class:`OrderLevels`)."""
    spec = check_fits(spec, grid)
    gh, gw = grid_shape(grid)
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive int; got {batch!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__} {generator!r:.40} "
                        "— pass torch.Generator().manual_seed(seed)")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0'; got {device!r}") from None
    batch = int(batch)
    draw_device = generator.device if generator is not None else torch.device(device or "cpu")
    rng = _Rng(generator, draw_device)
    if spec.kind == "prefix":
        perm, ranks, labels, blobs = _prefix(spec, batch, gh * gw, rng)
    else:
        labels, counts, blobs = _SAMPLERS[spec.kind](spec, batch, gh, gw, rng)
        perm, ranks = _traverse(labels, counts, batch, rng, shuffle=spec.kind != "raster")
    out = torch.device(device) if device is not None else draw_device

    def move(t: Tensor) -> Tensor:
        return _to_device(t, out)

    return OrderLevels(
        order=SegmentOrder._trusted(move(perm), move(ranks[0]), spec.segment_size((gh, gw))),
        ranks=tuple(map(move, ranks)),
        labels=tuple(move(lab.expand(batch, -1).contiguous()) for lab in labels),
        blobs=None if blobs is None else tuple((move(m), move(s)) for m, s in blobs),
    )


def _to_device(t: Tensor, device) -> Tensor:
    """t on ``device``: a host tensor bound for a GPU is pinned first so the copy is truly
    asynchronous (a non_blocking copy from pageable memory still blocks the host)."""
    device = torch.device(device)
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@dataclass(frozen=True)
class _Rng:
    """Every random number of a sample comes from here: one generator, one device."""

    generator: torch.Generator | None
    device: torch.device

    def uniform(self, *shape: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        # float64 so that ties between draws are practically impossible.
        u = torch.rand(*shape, generator=self.generator, device=self.device, dtype=torch.float64)
        return low + (high - low) * u

    def integers(self, batch: int, low: int, high: int) -> Tensor:
        """[batch] int64 uniform on low..high (inclusive)."""
        return torch.randint(low, high + 1, (batch,), generator=self.generator, device=self.device)

    def ranks(self, batch: int, n: int) -> Tensor:
        """[batch, n] int64: an independent uniformly random permutation of 0..n-1 per row."""
        return self.uniform(batch, n).argsort(dim=1).argsort(dim=1)


def _traverse(labels: list[Tensor], counts: list[int], batch: int, rng: _Rng, shuffle: bool):
    """Group labels per level (finest first, each [B or 1, N] raster order, groups nested) ->
    perm [B, N] int64 and the partition rank at each position per level ([B, N] int32 each).

    One stable sort per level, finest first: sorting by a random rank per group puts groups in
    random order; stability keeps the order found at the finer levels (and raster order inside
    a segment), so the last sort (coarsest) yields the recursive traversal.
    """
    n = labels[0].shape[1]
    labels = [lab.expand(batch, n) for lab in labels]
    perm = torch.arange(n, device=rng.device).expand(batch, n)
    for lab, count in zip(labels, counts):
        key = rng.ranks(batch, count).gather(1, lab) if shuffle else lab    # [B, N] group priority
        perm = perm.gather(1, key.gather(1, perm).sort(dim=1, stable=True).indices)
    ranks = []
    for lab in labels:
        along = lab.gather(1, perm)                                           # group id per position
        step = (along[:, 1:] != along[:, :-1]).to(torch.int32)
        ranks.append(torch.cat([torch.zeros_like(step[:, :1]), step.cumsum(1, dtype=torch.int32)], 1))
    return perm, ranks


# --------------------------------------------------------------------------------------------
# Samplers: each returns (labels, counts, blobs) — per level, finest first, the group id of each
# token in raster order ([B or 1, N] int64) and the number of possible ids; blobs as in OrderLevels.
# --------------------------------------------------------------------------------------------
def _token_labels(spec: OrderSpec, batch: int, gh: int, gw: int, rng: _Rng):
    """raster / random: every token its own segment."""
    return [torch.arange(gh * gw, device=rng.device)[None]], [gh * gw], None


def _square_labels(spec: OrderSpec, batch: int, gh: int, gw: int, rng: _Rng):
    """square:K[/...]: aligned MxM blocks; a coarser level is a block of blocks (check_fits has
    made sure each level's side is a multiple of the one below)."""
    rows = torch.arange(gh, device=rng.device)[:, None]
    cols = torch.arange(gw, device=rng.device)[None, :]
    labels = []
    for count in spec.counts:
        m = _square_side(count, gh, gw)
        labels.append(((rows // m) * (gw // m) + cols // m).reshape(1, -1))
    return labels, list(spec.counts), None


def _token_xy(gh: int, gw: int, device) -> Tensor:
    """[N, 2] float64 (x, y) of each token in raster order, each axis normalised to [-2, 2]
    (top-left token (-2, -2), bottom-right (2, 2)); a side of one token sits at 0."""
    def axis(n):
        if n == 1:
            return torch.zeros(1, dtype=torch.float64, device=device)
        return torch.linspace(-BLOB_EXTENT, BLOB_EXTENT, n, dtype=torch.float64, device=device)
    y, x = torch.meshgrid(axis(gh), axis(gw), indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)


def _blob_assign(points: Tensor, means: Tensor, stds: Tensor) -> Tensor:
    """argmax_k N(point | mean_k, diag(std_k^2)), normalisation included (A.2).
    points: [B or 1, P, 2], means/stds: [B, K, 2] -> [B, P] int64 component index."""
    # log density up to the constant -log(2*pi), which is the same for every component; the
    # -log(std_x * std_y) term is the normalisation, which makes wide blobs weaker per token.
    log_density = -stds.log().sum(-1)[:, None]                                  # [B, 1, K]
    for axis in range(2):
        z = (points[:, :, None, axis] - means[:, None, :, axis]) / stds[:, None, :, axis]
        log_density = log_density - 0.5 * z * z                                # [B, P, K]
    return log_density.argmax(dim=-1)


def _blob_labels(spec: OrderSpec, batch: int, gh: int, gw: int, rng: _Rng):
    """blob:K[/...]: tokens go to the densest of K sampled Gaussians (A.2). Hierarchy rule: the
    next level draws a fresh mixture from the same A.2 distributions and each group of the level
    below joins the component densest at its centroid (the mean position of its tokens); empty
    components are dropped (they never appear as labels)."""
    xy = _token_xy(gh, gw, rng.device)[None]                                    # [1, N, 2]
    labels, blobs = [], []
    for level, count in enumerate(spec.counts):
        means = rng.uniform(batch, count, 2, low=BLOB_MEAN_RANGE[0], high=BLOB_MEAN_RANGE[1])
        stds = rng.uniform(batch, count, 2, low=BLOB_STD_RANGE[0], high=BLOB_STD_RANGE[1])
        if level == 0:
            labels.append(_blob_assign(xy, means, stds))
        else:
            below, n_below = labels[-1], spec.counts[level - 1]
            sums = xy.new_zeros(batch, n_below, 2).scatter_add_(1, below[..., None].expand(-1, -1, 2),
                                                                xy.expand(batch, -1, -1))
            sizes = torch.zeros(batch, n_below, dtype=torch.float64, device=rng.device)
            sizes.scatter_add_(1, below, torch.ones_like(below, dtype=torch.float64))
            centroids = sums / sizes.clamp(min=1)[..., None]                     # empty groups: unused
            labels.append(_blob_assign(centroids, means, stds).gather(1, below))
        blobs.append((means, stds))
    return labels, list(spec.counts), blobs


def _incoherent_labels(spec: OrderSpec, batch: int, gh: int, gw: int, rng: _Rng):
    """incoherent:K: a uniformly random split of the tokens into K groups of N/K (the ablation
    of spatial coherence): token t joins group rank(t) // (N/K) for a random token ranking."""
    n = gh * gw
    return [rng.ranks(batch, n) // (n // spec.counts[0])], list(spec.counts), None


def _prefix(spec: OrderSpec, batch: int, n: int, rng: _Rng):
    """prefix[:raster|random]: perm in raster or random order; P ~ U{LO..HI} per image;
    seg = max(0, position - P + 1), i.e. [0]*P + [1, 2, ..., N-P]. No host sync: P stays a tensor.
    -> (perm, (seg,), (raster labels,), None) as the other samplers' traversal returns."""
    lo, hi = prefix_range(spec, n)
    length = rng.integers(batch, lo, hi)                                         # [B] prefix lengths
    position = torch.arange(n, device=rng.device)
    if spec.tokens == "random":
        perm = rng.uniform(batch, n).argsort(dim=1)
    else:
        perm = position.expand(batch, n).contiguous()
    seg = (position[None] - length[:, None] + 1).clamp(min=0).to(torch.int32)
    labels = torch.empty(batch, n, dtype=torch.int64, device=rng.device).scatter_(1, perm, seg.long())
    return perm, (seg,), (labels,), None


_SAMPLERS = {
    "raster": _token_labels,
    "random": _token_labels,
    "square": _square_labels,
    "blob": _blob_labels,
    "incoherent": _incoherent_labels,
}
