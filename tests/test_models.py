"""Whole models: permuted-order fast path == dense raster-order reference; causality; bad input."""
import pytest
import torch

from randsac_fast import SegmentOrder, models, orders
from randsac_fast.models import dense

TINY = dict(img_size=16, patch_size=2, in_chans=3, embed_dim=32, depth=3, num_heads=2)   # 8x8 grid


def _randsac(skip, backend="reference", **kw):
    torch.manual_seed(0)
    return models.build("randsac_vit_tiny", decoder_depth=2, skip_memory=skip, backend=backend,
                        **{**TINY, **kw}).double()


def _saim(share, backend="reference", **kw):
    torch.manual_seed(0)
    return models.build("saim_vit_tiny", share_weight=share, backend=backend, blur_kernel=3,
                        **{**TINY, **kw}).double()


def _images(b=2, seed=0):
    return torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params, allow_unused=True)


def _compare(model, fast_loss, ref_loss, rtol=1e-9):
    (lf, gf), (lr, gr) = _grads(model, fast_loss), _grads(model, ref_loss)
    torch.testing.assert_close(lf, lr, rtol=rtol, atol=1e-12)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, gf, gr):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10, msg=lambda m: f"{name}: {m}")


def _perturb_skip(model):
    """Random skip weights so that every encoder layer reaches the decoder."""
    if getattr(model, "skip_weight", None) is not None:
        with torch.no_grad():
            model.skip_weight.copy_(torch.randn(model.skip_weight.shape, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("spec,skip", [("square:16", False), ("square:16/4", True), ("blob:6", False),
                                       ("blob:11/5", True), ("random", False), ("incoherent:8", True)])
def test_randsac_matches_dense_reference(spec, skip, backend):
    model = _randsac(skip, backend)
    _perturb_skip(model)
    x = _images()
    order = orders.sample(spec, 2, model.grid, generator=torch.Generator().manual_seed(3))
    _compare(model, model(x, order), dense.randsac_loss_dense(model, x, order))


def test_randsac_padding_equals_slicing():
    """Fixed-size segments: right padding with sentinels gives the same loss and gradients as slicing."""
    model = _randsac(True)
    _perturb_skip(model)
    x = _images()
    order = orders.sample("square:16/4", 2, model.grid, generator=torch.Generator().manual_seed(4))
    _compare(model, model(x, order, pad=True), model(x, order, pad=False))


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("spec", ["random", "square:16"])
def test_saim_matches_dense_reference(share, backend, spec):
    model = _saim(share, backend)
    x = _images()
    order = orders.sample(spec, 2, model.grid, generator=torch.Generator().manual_seed(5))
    _compare(model, model(x, order), dense.saim_loss_dense(model, x, order))


def test_saim_query_depth_step_and_head_variants():
    torch.manual_seed(0)
    model = models.build("saim_vit_tiny", **{**TINY, "depth": 4}, query_depth=2, head="linear", loss="l1",
                         backend="reference").double()
    assert model.step == 2 and len(model.query_blocks) == 2
    x = _images()
    order = orders.sample("random", 2, model.grid, generator=torch.Generator().manual_seed(6))
    _compare(model, model(x, order), dense.saim_loss_dense(model, x, order))


@pytest.mark.parametrize("which", ["randsac", "saim"])
def test_causality(which):
    """Perturbing segment s changes no prediction of segments <= s and does change later ones."""
    model = _randsac(True) if which == "randsac" else _saim(False)
    _perturb_skip(model)
    x = _images(1)
    order = orders.sample("square:16" if which == "randsac" else "random", 1, model.grid,
                          generator=torch.Generator().manual_seed(7))
    rank = order.ranks()[0]                                     # [N] raster ranks
    s = int(rank.max()) // 2
    p = model.patch_size
    gw = model.grid[1]
    x2 = x.clone()
    for t in (rank == s).nonzero().flatten().tolist():
        r, c = divmod(t, gw)
        x2[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p] += torch.randn(3, p, p, dtype=x.dtype)
    pred1, valid = model.predict(x, order)
    pred2, _ = model.predict(x2, order)
    changed = (pred1 - pred2).abs().amax(-1)[0] > 1e-9
    assert not changed[rank <= s].any(), "a prediction of segment <= s saw segment s"
    later = (rank > s) & valid[0]
    assert changed[later].all(), "every later prediction should depend on segment s"


def test_predict_returns_raster_order():
    model = _randsac(False)
    x = _images(2)
    order = orders.sample("blob:6", 2, model.grid, generator=torch.Generator().manual_seed(8))
    pred, valid = model.predict(x, order)
    ref, ref_valid = dense.randsac_forward_dense(model, x, order)
    assert torch.equal(valid, ref_valid)
    torch.testing.assert_close(pred[valid], ref[valid])


def test_build_and_bad_input():
    with pytest.raises(ValueError, match="unknown model"):
        models.build("randsac_vit_huge")
    with pytest.raises(ValueError, match="unknown override"):
        models.build("randsac_vit_tiny", decoder_layers=3)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        models.build("saim_vit_tiny", img_size=30, patch_size=16)
    m = models.build("randsac_vit_tiny", **TINY, decoder_depth=1)
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        m(torch.randn(1, 3, 32, 32), orders.sample("square:16", 1, 8))
    with pytest.raises(ValueError, match="tokens"):
        m(torch.randn(1, 3, 16, 16), orders.sample("square:16", 1, 16))
    one = SegmentOrder.from_perm(torch.arange(64)[None], torch.zeros(1, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least 2 segments"):
        m(torch.randn(1, 3, 16, 16), one)
    for name in models.names():
        assert name.split("_vit_")[0] in ("randsac", "saim", "aim")


def test_paper_sizes():
    b = models.build("randsac_vit_base")
    assert (b.config.embed_dim, b.config.depth, b.config.num_heads, b.config.decoder_depth) == (768, 12, 12, 8)
    assert b.grid == (12, 12)
    s = models.build("saim_vit_base", depth=12)
    assert s.grid == (14, 14) and len(s.query_blocks) == 12
    assert s.pos_embed.shape == (1, 197, 768) and s.pos_embed[0, 0].abs().sum() == 0


def test_saim_state_dict_layout_is_official_like():
    m = models.build("saim_vit_tiny", **TINY)
    keys = set(m.state_dict())
    for k in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
              "blocks.0.attn.proj.weight", "blocks.0.norm1.weight", "blocks.0.mlp.fc1.weight",
              "query_blocks.0.attn.qkv.weight", "norm.weight", "prediction_head.fc1.weight",
              "prediction_head.fc2.bias"]:
        assert k in keys, k


def test_forward_features_shapes():
    r = models.build("randsac_vit_tiny", **TINY, decoder_depth=1)
    s = models.build("saim_vit_tiny", **TINY)
    x = torch.randn(2, 3, 16, 16)
    assert r.forward_features(x).shape == (2, 64, 32)
    assert s.forward_features(x).shape == (2, 65, 32)


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    m = models.build("randsac_vit_tiny", **TINY, decoder_depth=1, backend="sdpa")
    x = torch.randn(4, 3, 16, 16)
    order = orders.sample("square:16", 4, m.grid, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = m(x, order)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_train_flops_counts_visible_pairs_only():
    from randsac_fast import ops, reference
    seg = orders.sample("square:16", 2, 8, generator=torch.Generator().manual_seed(0)).seg
    for inclusive in (True, False):
        dense_count = reference.visibility(seg, seg, inclusive).sum(dim=(1, 2))
        assert torch.equal(ops.visible_pairs(seg, seg, inclusive), dense_count)
    m = models.build("randsac_vit_tiny", **TINY, decoder_depth=1)
    r = orders.sample("square:16", 2, m.grid, generator=torch.Generator().manual_seed(0))
    s = models.build("saim_vit_tiny", **TINY)
    o = orders.sample("random", 2, s.grid, generator=torch.Generator().manual_seed(0))
    # lower bound: 6 x params x tokens is the textbook count for the linears alone
    for model, order in ((m, r), (s, o)):
        f = model.train_flops(order)
        assert f > 0 and f < 6 * 2 * sum(p.numel() for p in model.parameters()) * 64 * 2
