"""Segment-order samplers: the perm/seg contract, the paper's segment rules, uniform random
traversal (chi-square tests with fixed seeds), reproducibility and clear errors."""
import math

import numpy as np
import pytest
import torch

from randsac_fast import orders
from randsac_fast.orders import SegmentOrder

# Specs per grid: flat and hierarchical, every kind.
COMMON = ["raster", "random", "blob:5", "blob:11/5", "blob:20/8/3", "incoherent:4"]
SPECS = {
    8: COMMON + ["square:16", "square:4", "square:16/4", "square:64/16/4"],
    12: COMMON + ["square:16", "square:36", "square:16/4", "square:36/4", "square:144/36/4"],
    14: COMMON + ["square:49", "square:4", "square:196/4"],
    (8, 12): COMMON + ["square:24", "square:6", "square:24/6", "square:96/24/6"],
}
CASES = [(spec, grid) for grid, specs in SPECS.items() for spec in specs]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def num_tokens(grid) -> int:
    gh, gw = orders.grid_shape(grid)
    return gh * gw


def chi2_threshold(df: int, z: float = 3.09) -> float:
    """Upper 0.1% quantile of chi-square(df) (Wilson-Hilferty): a fair sampler fails with
    probability ~0.001 (and the seeds are fixed); a biased one lands far above."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_uniform(values: torch.Tensor, categories: int) -> None:
    counts = torch.bincount(values.flatten().long(), minlength=categories).double()
    assert counts.numel() == categories, f"values outside 0..{categories - 1}"
    expected = counts.sum() / categories
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < chi2_threshold(categories - 1), f"chi2 {stat:.1f} (df {categories - 1}); counts {counts.tolist()}"


# --------------------------------------------------------------------------------------------
# The contract, for every spec on every grid
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,grid", CASES, ids=[f"{s}@{g}" for s, g in CASES])
def test_contract(spec, grid):
    n, batch = num_tokens(grid), 6
    lv = orders.sample_levels(spec, batch, grid, generator=gen(1))
    perm, seg = lv.order.perm, lv.order.seg
    assert perm.shape == seg.shape == (batch, n)
    assert perm.dtype == torch.int64 and seg.dtype == torch.int32
    lv.order.validate()                                    # permutation; seg sorted, compact, from 0
    assert torch.equal(lv.ranks[0], seg)
    parsed = orders.parse_spec(spec)
    assert len(lv.ranks) == len(lv.labels) == parsed.num_levels
    # Tokens inside one segment come in raster order.
    same = seg[:, 1:] == seg[:, :-1]
    assert bool((perm[:, 1:] > perm[:, :-1])[same].all())
    for level, (rank, label) in enumerate(zip(lv.ranks, lv.labels)):
        steps = rank[:, 1:] - rank[:, :-1]
        assert bool(((steps == 0) | (steps == 1)).all()) and bool((rank[:, 0] == 0).all())
        # Contiguous: each partition (raw label) occupies exactly one run of positions.
        along = label.gather(1, perm)
        for b in range(batch):
            pairs = set(zip(along[b].tolist(), rank[b].tolist()))
            assert len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})
        # Nested: a group of the level below never straddles two partitions of this level.
        if level:
            below = lv.ranks[level - 1]
            changes = rank[:, 1:] != rank[:, :-1]
            assert bool((below[:, 1:] != below[:, :-1])[changes].all())
    counts = lv.order.num_segments()
    if parsed.kind in ("raster", "random"):
        assert bool((counts == n).all())
    elif parsed.kind == "blob":
        assert bool((counts <= parsed.counts[0]).all())
        for rank, k in zip(lv.ranks, parsed.counts):
            assert bool((rank[:, -1] < k).all())
    else:
        for rank, k in zip(lv.ranks, parsed.counts):
            assert bool((rank[:, -1] == k - 1).all())        # squares and incoherent: exactly K


def test_raster_is_identity():
    order = orders.sample("raster", 3, (4, 5))
    assert torch.equal(order.perm, torch.arange(20).expand(3, 20))
    assert torch.equal(order.seg, torch.arange(20, dtype=torch.int32).expand(3, 20))


@pytest.mark.parametrize("spec,grid", [(s, g) for s, g in CASES if s.startswith("square")])
def test_square_levels_are_aligned_blocks(spec, grid):
    """Every level is a tiling by aligned MxM blocks: a partition of square:16/4 is a block of blocks."""
    gh, gw = orders.grid_shape(grid)
    lv = orders.sample_levels(spec, 4, grid, generator=gen(2))
    for level, k in enumerate(orders.parse_spec(spec).counts):
        m = math.isqrt(gh * gw // k)
        blocks = lv.raster_ranks(level).reshape(4, gh // m, m, gw // m, m).permute(0, 1, 3, 2, 4)
        blocks = blocks.reshape(4, k, m * m)
        assert bool((blocks == blocks[..., :1]).all()), "a block holds tokens of two partitions"
        assert all(len(set(row.tolist())) == k for row in blocks[..., 0]), "two blocks share a rank"


def test_incoherent_groups_are_equal_and_random():
    lv = orders.sample_levels("incoherent:8", 5, 8, generator=gen(3))
    sizes = torch.stack([torch.bincount(row, minlength=8) for row in lv.order.seg.long()])
    assert bool((sizes == 8).all())
    # Membership differs between samples (it is drawn, not a fixed tiling).
    assert len({tuple(row.tolist()) for row in lv.labels[0]}) == 5


# --------------------------------------------------------------------------------------------
# Blobs: the appendix A.2 rule, recomputed independently with numpy
# --------------------------------------------------------------------------------------------
def a2_argmax(points: np.ndarray, means: np.ndarray, stds: np.ndarray) -> np.ndarray:
    """points [P, 2], means/stds [K, 2] -> [P] argmax_k of the normalised axis-aligned Gaussian."""
    d = points[:, None, :] - means[None]
    density = np.exp(-0.5 * ((d / stds[None]) ** 2).sum(-1)) / (2 * np.pi * stds.prod(-1))[None]
    return density.argmax(-1)


@pytest.mark.parametrize("spec,grid", [("blob:5", 8), ("blob:11/5", (8, 12)), ("blob:20/8/3", 14)])
def test_blob_assignment_matches_appendix_a2(spec, grid):
    gh, gw = orders.grid_shape(grid)
    lv = orders.sample_levels(spec, 8, grid, generator=gen(4))
    xs, ys = np.meshgrid(np.linspace(-2, 2, gw), np.linspace(-2, 2, gh))      # top-left (-2, -2)
    points = np.stack([xs.ravel(), ys.ravel()], -1)
    assert lv.blobs is not None and len(lv.blobs) == len(lv.labels)
    for level, (means, stds) in enumerate(lv.blobs):
        means, stds = means.numpy(), stds.numpy()
        assert means.min() >= -1.75 and means.max() <= 1.75 and stds.min() >= 0.5 and stds.max() <= 1.0
        assert means.std() > 0.5 and stds.std() > 0.1                         # really drawn, not constant
        for b in range(8):
            labels = lv.labels[level][b].numpy()
            if level == 0:
                expect = a2_argmax(points, means[b], stds[b])
            else:  # documented rule: each group joins the densest component at its centroid
                below = lv.labels[level - 1][b].numpy()
                groups = np.unique(below)
                centroids = np.stack([points[below == g].mean(0) for g in groups])
                expect = a2_argmax(centroids, means[b], stds[b])[np.searchsorted(groups, below)]
            np.testing.assert_array_equal(labels, expect)
    # The order's segments are exactly the non-empty components.
    for b in range(8):
        pairs = set(zip(lv.labels[0][b].tolist(), lv.raster_ranks(0)[b].tolist()))
        assert len(pairs) == len(set(lv.labels[0][b].tolist())) == int(lv.order.num_segments()[b])


# --------------------------------------------------------------------------------------------
# Uniform random traversal
# --------------------------------------------------------------------------------------------
def test_random_token_order_is_uniform():
    order = orders.sample("random", 6400, 8, generator=gen(5))
    assert_uniform((order.perm == 0).int().argmax(1), 64)          # where token 0 lands
    small = orders.sample("random", 4800, 2, generator=gen(6))       # all 24 orders of a 2x2 grid
    code = (small.perm * torch.tensor([64, 16, 4, 1])).sum(1)
    assert_uniform(torch.unique(code, return_inverse=True)[1], 24)


def test_square_segment_order_is_uniform():
    lv = orders.sample_levels("square:16", 8000, 8, generator=gen(7))
    assert_uniform(lv.labels[0].gather(1, lv.order.perm[:, :1]), 16)   # which square comes first


def test_hierarchical_square_traversal_is_uniform():
    lv = orders.sample_levels("square:16/4", 9600, 8, generator=gen(8))
    square, part = (lab.gather(1, lv.order.perm) for lab in lv.labels)    # per position
    # Partition order: each of the 4! orders of the 4 partitions equally likely.
    runs = part[:, ::16]                                                    # 16 tokens per partition
    code = (runs * torch.tensor([64, 16, 4, 1])).sum(1)
    assert_uniform(torch.unique(code, return_inverse=True)[1], 24)
    # The first square is uniform over all 16; the second is in the same partition and is a
    # uniformly chosen one of the three siblings (indexed in raster-sorted order).
    assert_uniform(square[:, 0], 16)
    first, second = square[:, 0], square[:, 4]
    assert bool((part[:, 4] == part[:, 0]).all())
    part_of_square = torch.tensor([(s // 4) // 2 * 2 + (s % 4) // 2 for s in range(16)])
    siblings = part_of_square[None] == part_of_square[first][:, None]          # [B, 16]
    siblings[torch.arange(len(first)), first] = False
    before = siblings & (torch.arange(16)[None] < second[:, None])
    assert bool(siblings.gather(1, second[:, None]).all())
    assert_uniform(before.sum(1), 3)


def test_blob_segment_order_is_uniform():
    lv = orders.sample_levels("blob:4", 12000, 8, generator=gen(9))
    full = lv.order.num_segments() == 4                          # condition on all 4 blobs non-empty
    assert int(full.sum()) > 2000
    first = lv.labels[0].gather(1, lv.order.perm[:, :1])[:, 0]
    assert_uniform(first[full], 4)


def test_incoherent_order_is_uniform():
    order = orders.sample("incoherent:4", 8000, (2, 4), generator=gen(10))    # 4 pairs of tokens
    rank = order.ranks()                                                        # raster order
    assert_uniform(rank[:, 0], 4)                                  # when token 0's group comes
    partner = ((rank == rank[:, :1]) & (torch.arange(8) > 0)).int().argmax(1) - 1
    assert_uniform(partner, 7)                                     # who shares token 0's group


def test_uniformity_check_has_power():
    """The chi-square check above rejects a mildly biased sampler (e.g. one square 2x as likely)."""
    biased = torch.cat([torch.arange(16).repeat(500), torch.zeros(500, dtype=torch.long)])
    with pytest.raises(AssertionError):
        assert_uniform(biased, 16)


# --------------------------------------------------------------------------------------------
# Reproducibility, independence, devices
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["random", "square:16/4", "blob:11/5", "incoherent:4", "square:64/16/4"])
def test_seeded_reproducible_and_independent(spec):
    a = orders.sample(spec, 8, 8, generator=gen(11))
    b = orders.sample(spec, 8, 8, generator=gen(11))
    c = orders.sample(spec, 8, 8, generator=gen(12))
    assert torch.equal(a.perm, b.perm) and torch.equal(a.seg, b.seg)
    assert not torch.equal(a.perm, c.perm)
    assert len({tuple(row.tolist()) for row in a.perm}) == 8            # rows drawn independently


def test_device_argument_cpu():
    for device in ("cpu", torch.device("cpu"), None):
        order = orders.sample("square:16/4", 2, 8, generator=gen(13), device=device)
        assert order.perm.device.type == "cpu" and order.seg.device.type == "cpu"
    lv = orders.sample_levels("blob:6/3", 2, 8, device="cpu")               # no generator
    assert all(t.device.type == "cpu" for t in (*lv.ranks, *lv.labels, *lv.blobs[0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_argument_cuda():
    for spec in ("random", "square:16/4", "blob:11/5", "incoherent:4"):
        cpu = orders.sample(spec, 4, 8, generator=gen(14))
        moved = orders.sample(spec, 4, 8, generator=gen(14), device="cuda")   # drawn on CPU, moved
        assert moved.perm.is_cuda and moved.seg.is_cuda
        assert torch.equal(moved.perm.cpu(), cpu.perm) and torch.equal(moved.seg.cpu(), cpu.seg)
        g = torch.Generator(device="cuda").manual_seed(14)                   # drawn on the GPU
        on_gpu = orders.sample(spec, 4, 8, generator=g)
        assert on_gpu.perm.is_cuda
        on_gpu.validate()


# --------------------------------------------------------------------------------------------
# Specs and errors
# --------------------------------------------------------------------------------------------
def test_parse_spec():
    assert orders.parse_spec(" Square:16/4 ") == orders.OrderSpec("square", (16, 4))
    assert str(orders.parse_spec("blob:11/5")) == "blob:11/5"
    assert orders.parse_spec("random") == orders.OrderSpec("random")
    assert orders.parse_spec("square:16").segment_size(8) == 4
    assert orders.parse_spec("incoherent:4").segment_size((8, 12)) == 24
    assert orders.parse_spec("blob:5").segment_size(8) is None
    assert orders.check_fits("square:16", 12) == orders.OrderSpec("square", (16,))


@pytest.mark.parametrize("spec,grid,match", [
    ("square:16", 13, r"square:16 needs grid sides divisible by 4; got 13x13 — use blob:K"),
    ("square:9", 8, r"divisible by 3; got 8x8 — square counts that fit: 16, 4"),
    ("square:10", 8, r"square number of squares"),
    ("square:5", (8, 12), r"\(H/M\)\*\(W/M\) = 5; got 8x12 — square counts that fit: 24, 6"),
    ("square:36/16", 12, r"3x3 partitions cannot be built from 2x2 squares"),
    ("square:16/4/8", 8, r"counts must decrease"),
    ("blob:4/8", 8, r"counts must decrease"),
    ("blob:4/4", 8, r"counts must decrease"),
    ("blob:65", 8, r"more segments than the 64 tokens"),
    ("incoherent:5", 8, r"K must divide the 64 tokens.*2, 4, 8, 16, 32"),
    ("incoherent:16/4", 8, r"incoherent takes one count"),
    ("random:4", 8, r"random takes no count"),
    ("square", 8, r"square needs a segment count"),
    ("square:x", 8, r"positive integers; got 'x'"),
    ("square:-4", 8, r"positive integers"),
    ("blob:1", 8, r"at least 2"),
    ("squares:16", 8, r"unknown order spec 'squares:16'. Valid forms: raster \| random \| square:K"),
    ("", 8, r"unknown order spec"),
    ("random", 0, r"grid must be a positive int"),
    ("random", (8, 8, 8), r"grid must be"),
    ("random", 8.5, r"grid must be"),
])
def test_bad_specs_raise_one_clear_error(spec, grid, match):
    with pytest.raises(ValueError, match=match):
        orders.check_fits(spec, grid)
    with pytest.raises(ValueError, match=match):
        orders.sample(spec, 2, grid, generator=gen(0))


def test_bad_types_and_batch():
    with pytest.raises(TypeError, match="order spec is a string"):
        orders.parse_spec(16)
    with pytest.raises(ValueError, match="batch must be a positive int"):
        orders.sample("random", 0, 8)


# --------------------------------------------------------------------------------------------
# SegmentOrder.from_perm validation
# --------------------------------------------------------------------------------------------
def test_from_perm_accepts_valid_orders():
    order = SegmentOrder.from_perm(torch.tensor([2, 0, 1, 3]), torch.tensor([0, 0, 1, 2]))
    assert order.perm.shape == (1, 4) and order.seg.dtype == torch.int32
    assert torch.equal(order.ranks(), torch.tensor([[0, 1, 0, 2]], dtype=torch.int32))
    assert torch.equal(SegmentOrder.from_perm(torch.tensor([[1, 0]])).seg, torch.tensor([[0, 1]], dtype=torch.int32))


@pytest.mark.parametrize("perm,seg,error,match", [
    ([0, 0, 1, 2], None, ValueError, "permutations of 0..3"),
    ([0, 1, 2, 4], None, ValueError, "permutations"),
    ([0, 1, 2, 3], [0, 1, 0, 1], ValueError, "non-decreasing"),
    ([0, 1, 2, 3], [0, 0, 2, 2], ValueError, "steps of 0 or 1"),
    ([0, 1, 2, 3], [1, 1, 2, 2], ValueError, "start at 0"),
    ([0, 1, 2, 3], [0, 1, 2], ValueError, "same shape"),
    ([[[0, 1]]], None, ValueError, r"perm must be \[B, N\]"),
    ([0.0, 1.0], None, TypeError, "integer token indices"),
    ([0, 1], [0.0, 1.0], TypeError, "integer segment ranks"),
])
def test_from_perm_rejects(perm, seg, error, match):
    with pytest.raises(error, match=match):
        SegmentOrder.from_perm(torch.tensor(perm), None if seg is None else torch.tensor(seg))
