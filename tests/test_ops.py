"""Public ops (reference and sdpa backends) against the float64 dense reference, and bad input."""
import pytest
import torch

from helpers import assert_close_by_rule, random_seg
from randsac_fast import ops, orders, reference

CPU_BACKENDS = ["reference", "sdpa"]


def _qkv(b, h, nq, nk, d, dtype, gen):
    q = torch.randn(b, h, nq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, h, nk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, h, nk, d, generator=gen, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _run(q, k, v, sq, sk, inclusive, backend):
    out = ops.segment_attention(q, k, v, sq, sk, inclusive=inclusive, backend=backend)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return (out, *grads)


def _ref64(q, k, v, sq, sk, inclusive):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference.segment_attention(q64, k64, v64, sq, sk, inclusive=inclusive)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return (out, *torch.autograd.grad(out, (q64, k64, v64), do))


CASES = [  # (B, H, Nq, Nk, D, max segments)
    (2, 2, 17, 17, 16, 5),     # tails, several segments
    (1, 3, 9, 23, 32, 9),      # Nq != Nk
    (2, 1, 1, 1, 16, 1),       # N = 1
    (2, 2, 12, 12, 8, 12),     # every token its own segment
    (1, 2, 10, 10, 8, 1),      # one segment
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("inclusive", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_attention_matches_reference(backend, inclusive, case):
    b, h, nq, nk, d, ms = case
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    sq = random_seg(b, nq, ms, gen)
    sk = random_seg(b, nk, ms, gen) if nk != nq else sq
    q, k, v = _qkv(b, h, nq, nk, d, torch.float32, gen)
    ref = _ref64(q, k, v, sq, sk, inclusive)
    fast = _run(q, k, v, sq, sk, inclusive, backend)
    plain = _run(q, k, v, sq, sk, inclusive, "reference")
    for name, f, p, r in zip("out dq dk dv".split(), fast, plain, ref):
        assert_close_by_rule(f, p, r, what=f"{backend} {name}")
    # float64 all the way: both backends agree with the reference to rounding
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    for f, r in zip(_run(q64, k64, v64, sq, sk, inclusive, backend), ref):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_masked_rows_are_zero_with_zero_grad(backend):
    gen = torch.Generator().manual_seed(0)
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3]], dtype=torch.int32)
    q, k, v = _qkv(1, 2, 8, 8, 8, torch.float32, gen)
    out, dq, dk, dv = _run(q, k, v, seg, seg, False, backend)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert (out[:, :, :3] == 0).all(), "the first segment sees nothing under the strict mask"
    assert (dq[:, :, :3] == 0).all()
    assert out[:, :, 3:].abs().sum() > 0
    # keys of the last segment are visible to nobody under the strict mask
    assert (dk[:, :, 6:] == 0).all() and (dv[:, :, 6:] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sentinel_padded_keys_are_invisible(backend):
    gen = torch.Generator().manual_seed(1)
    sq = torch.tensor([[0, 1, 1, 2]], dtype=torch.int32)
    sk = torch.tensor([[0, 0, 1, 2, 2**30, 2**30]], dtype=torch.int32)
    q, k, v = _qkv(1, 1, 4, 6, 8, torch.float64, gen)
    out = ops.segment_attention(q, k, v, sq, sk, inclusive=True, backend=backend)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 4:] = 1e3
    v2[:, :, 4:] = -1e3
    out2 = ops.segment_attention(q, k2, v2, sq, sk, inclusive=True, backend=backend)
    torch.testing.assert_close(out, out2)


def test_views_of_fused_qkv_are_accepted():
    gen = torch.Generator().manual_seed(2)
    b, n, h, d = 2, 10, 2, 8
    qkv = torch.randn(b, n, 3, h, d, generator=gen)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    seg = random_seg(b, n, 4, gen)
    out = ops.segment_attention(q, k, v, seg, seg, inclusive=True, backend="sdpa")
    ref = reference.segment_attention(q.contiguous(), k.contiguous(), v.contiguous(), seg, seg, inclusive=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_orders_of_every_spec_drive_attention():
    """Seg ids straight from the samplers (sorted by construction) pass validation and match."""
    gen = torch.Generator().manual_seed(3)
    for spec in ["raster", "random", "square:16", "blob:6", "square:16/4", "blob:11/5", "incoherent:8"]:
        o = orders.sample(spec, 2, 8, generator=gen)
        q, k, v = _qkv(2, 1, 64, 64, 8, torch.float64, gen)
        for inclusive in (True, False):
            a = ops.segment_attention(q, k, v, o.seg, o.seg, inclusive=inclusive, backend="sdpa")
            r = reference.segment_attention(q, k, v, o.seg, o.seg, inclusive=inclusive)
            torch.testing.assert_close(a, r)


# ---------------------------------------------------------------------------- bad input
def test_attention_rejects_bad_seg():
    q = torch.randn(1, 1, 4, 8)
    good = torch.tensor([[0, 0, 1, 2]], dtype=torch.int32)
    with pytest.raises(TypeError, match="int32"):
        ops.segment_attention(q, q, q, good.long(), good, inclusive=True)
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.segment_attention(q, q, q, torch.tensor([[0, 2, 1, 3]], dtype=torch.int32), good, inclusive=True)
    with pytest.raises(ValueError, match="shape"):
        ops.segment_attention(q, q, q, good[:, :3], good, inclusive=True)
    # the sortedness check can be switched off (it costs a sync)
    ops.segment_attention(q, q, q, torch.tensor([[0, 2, 1, 3]], dtype=torch.int32), good, inclusive=True,
                          check_sorted=False)


def test_attention_rejects_bad_tensors():
    seg = torch.zeros(1, 4, dtype=torch.int32)
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="4-D"):
        ops.segment_attention(q[0], q, q, seg, seg, inclusive=True)
    with pytest.raises(TypeError, match="share a dtype"):
        ops.segment_attention(q, q.double(), q, seg, seg, inclusive=True)
    with pytest.raises(ValueError, match="contiguous last dim"):
        qt = torch.randn(1, 1, 8, 4).transpose(-1, -2)   # [1, 1, 4, 8] with last-dim stride 4
        ops.segment_attention(qt, q, q, seg, seg, inclusive=True)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.segment_attention(q, q, q, seg, seg, inclusive=True, backend="nope")


# ---------------------------------------------------------------------------- targets
@pytest.mark.parametrize("blur", [0, 3, 9])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_patch_targets_reference_path(blur, norm_pix):
    gen = torch.Generator().manual_seed(4)
    img = torch.randn(2, 3, 16, 12, generator=gen, dtype=torch.float64)
    perm = torch.stack([torch.randperm(12, generator=gen) for _ in range(2)])
    t = ops.patch_targets(img.float(), 4, blur_kernel=blur, norm_pix=norm_pix, perm=perm)
    assert t.dtype == torch.float32 and t.shape == (2, 12, 48)
    ref = reference.patch_targets(img, 4, blur_kernel=blur, norm_pix=norm_pix, perm=perm)
    torch.testing.assert_close(t.double(), ref, rtol=1e-4, atol=1e-4)


def test_gaussian_blur_is_saim_kernel():
    """A unit impulse far from the border reproduces the normalised 2D Gaussian."""
    img = torch.zeros(1, 1, 15, 15, dtype=torch.float64)
    img[0, 0, 7, 7] = 1.0
    out = reference.gaussian_blur(img, 5, 1.5)[0, 0, 5:10, 5:10]
    ax = torch.arange(5, dtype=torch.float64) - 2
    g = torch.exp(-(ax[:, None] ** 2 + ax[None] ** 2) / (2 * 1.5 ** 2))
    torch.testing.assert_close(out, g / g.sum())
    assert abs(out.sum().item() - 1.0) < 1e-12


def test_patchify_pixel_order_is_pqc():
    img = torch.arange(2 * 4 * 4, dtype=torch.float64).view(1, 2, 4, 4)   # C=2, 4x4, P=2
    p = reference.patchify(img, 2)
    # token 1 = top row, second column; pixel (p=0, q=1, c=1) -> index (0*2 + 1)*2 + 1 = 3
    assert p[0, 1, 3] == img[0, 1, 0, 3]
    torch.testing.assert_close(reference.unpatchify(p, 2, (2, 2), 2), img)


def test_norm_pix_uses_unbiased_var_and_eps():
    x = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]], dtype=torch.float64)
    out = reference.normalize_patches(x)
    expect = (x - 3.0) / torch.sqrt(torch.tensor(14.0 / 3.0 + 1e-6, dtype=torch.float64))
    torch.testing.assert_close(out, expect)


def test_patch_loss_reference_matches_manual():
    gen = torch.Generator().manual_seed(5)
    img = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    perm = torch.stack([torch.randperm(16, generator=gen)[:10] for _ in range(2)])
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 7:] = False
    pred = torch.randn(2, 10, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    for loss in ("mse", "l1"):
        got = ops.patch_loss(pred, img, 2, perm, valid, blur_kernel=3, loss=loss)
        t = reference.patch_targets(img, 2, blur_kernel=3, perm=perm)
        e = (pred - t) ** 2 if loss == "mse" else (pred - t).abs()
        want = e.mean(-1)[valid].mean()
        torch.testing.assert_close(got, want)


def test_targets_reject_bad_input():
    img = torch.randn(1, 3, 30, 32)
    with pytest.raises(ValueError, match="height 30 is not divisible by patch size 16"):
        ops.patch_targets(img, 16)
    with pytest.raises(ValueError, match="odd"):
        ops.patch_targets(torch.randn(1, 3, 32, 32), 16, blur_kernel=4)
    with pytest.raises(ValueError, match="outside"):
        ops.patch_targets(torch.randn(1, 3, 32, 32), 16, perm=torch.tensor([[0, 5]]))


# ---------------------------------------------------------------------------- skip memory
def test_skip_memory_reference_and_grads():
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(4, 2, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    z = ops.skip_memory(hidden, w, backend="reference")
    manual = torch.stack([sum(w[l, k] * hidden[k] for k in range(4)) for l in range(3)])
    torch.testing.assert_close(z, manual)
    assert torch.autograd.gradcheck(lambda h, ww: ops.skip_memory(h, ww, backend="reference"), (hidden, w))
    with pytest.raises(ValueError, match="Lenc = 4"):
        ops.skip_memory(hidden, w[:, :3])
