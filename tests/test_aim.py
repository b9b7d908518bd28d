"""AIM (prefix-causal pre-training): the prefix orders, the model against its dense float64
reference, causality, the loss on non-prefix patches only, save/load and the trainer preset."""
import os

import torch

if not torch.cuda.is_available():      # the Triton kernels under the interpreter (see test_attention_triton)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from randsac_fast import models, orders, reference  # noqa: E402
from randsac_fast.models import dense  # noqa: E402

TINY = dict(img_size=16, patch_size=2, in_chans=3, embed_dim=32, depth=3, num_heads=2, head_depth=2)   # 8x8 grid


def _aim(backend="reference", **kw):
    torch.manual_seed(0)
    return models.build("aim_vit_tiny", backend=backend, **{**TINY, **kw}).double()


def _images(b=3, seed=0):
    return torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Prefix orders
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["prefix", "prefix:raster", "prefix:random", "prefix:random:5-20", "prefix:7-7"])
def test_prefix_order_is_prefix_then_one_token_per_segment(spec):
    gen = torch.Generator().manual_seed(0)
    order = orders.sample(spec, 64, (6, 5), generator=gen)
    order.validate()                                           # perm a permutation, seg compact from 0
    n = 30
    lo, hi = orders.prefix_range(orders.parse_spec(spec), n)
    length = (order.seg == 0).sum(1)                           # the prefix is segment 0
    assert int(length.min()) >= lo and int(length.max()) <= hi
    position = torch.arange(n)
    expected = (position[None] - length[:, None] + 1).clamp(min=0).int()
    assert torch.equal(order.seg, expected)                    # [0]*P + [1, 2, ..., N-P]
    if orders.parse_spec(spec).tokens == "raster":
        assert torch.equal(order.perm, position.expand(64, n))
    else:
        assert not torch.equal(order.perm, position.expand(64, n))
    if lo < hi:
        assert len(set(length.tolist())) > 1                   # drawn per image, not per batch
    # visibility from seg alone: the prefix sees the whole prefix and nothing else; later tokens
    # see exactly the tokens up to themselves
    vis = reference.visibility(order.seg, order.seg, inclusive=True)
    for b in range(4):
        p = int(length[b])
        want = torch.ones(n, n).tril().bool()
        want[:p, :p] = True
        assert torch.equal(vis[b], want)
    again = orders.sample(spec, 64, (6, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.perm, order.perm) and torch.equal(again.seg, order.seg)


def test_prefix_length_default_is_aim_range_and_uniform():
    order = orders.sample("prefix", 4000, (3, 3), generator=torch.Generator().manual_seed(1))
    counts = torch.bincount((order.seg == 0).sum(1), minlength=9)
    assert counts[0] == 0 and counts[9:].sum() == 0           # 1..N-1: the prefix never fills the image
    assert (counts[1:9] > 4000 / 8 * 0.85).all(), counts       # every length 1..8 drawn about equally


class _HostReads(TorchDispatchMode):
    """Counts the ops that copy a tensor value to the host (item / bool / tolist)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("spec", ["prefix", "prefix:random"])
def test_prefix_sampling_never_reads_device_values(spec):
    with _HostReads() as mode:
        orders.sample(spec, 8, 12, generator=torch.Generator().manual_seed(0))
    assert mode.reads == 0


@pytest.mark.parametrize("spec,match", [("prefix:sideways", "LO-HI"), ("prefix:0-4", "1 <= LO <= HI"),
                                        ("prefix:5-3", "1 <= LO <= HI"), ("prefix:raster:1-64", "at most 63"),
                                        ("prefix:random:2-3:4", "optionally")])
def test_bad_prefix_specs_are_refused_with_the_fix(spec, match):
    with pytest.raises(ValueError, match=match):
        orders.check_fits(spec, 8)


# --------------------------------------------------------------------------------------------
# The model against its dense reference
# --------------------------------------------------------------------------------------------
def _loss_and_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("spec", ["prefix", "prefix:random", "prefix:1-1", "prefix:63-63"])
def test_aim_matches_dense_reference_float64(spec, backend):
    """Loss and every gradient of the permuted fast path == the raster-order masked reference."""
    model = _aim(backend)
    x = _images()
    order = orders.sample(spec, 3, model.grid, generator=torch.Generator().manual_seed(3))
    (lf, gf), (lr, gr) = _loss_and_grads(model, model(x, order)), _loss_and_grads(model, dense.aim_loss_dense(model, x, order))
    torch.testing.assert_close(lf, lr, rtol=1e-9, atol=1e-12)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, gf, gr):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("spec", ["prefix", "prefix:random"])
def test_aim_triton_matches_float64_by_the_flash_attention_rule(spec):
    """On the Triton kernels (fp32): loss and every gradient vs float64 within a small multiple of
    plain fp32 PyTorch's error."""
    model = _aim("sdpa").float()
    x = _images(2)
    order = orders.sample(spec, 2, model.grid, generator=torch.Generator().manual_seed(4))

    def run(backend, dtype):
        m = model.to(dtype)
        models.vit.set_backend(m, backend)
        m.zero_grad()
        loss = m(x.to(dtype), order)
        loss.backward()
        return [loss.detach().double()] + [p.grad.double().clone() for p in m.parameters()]

    exact = run("sdpa", torch.float64)
    plain = run("sdpa", torch.float32)
    fast = run("triton", torch.float32)
    for got, base, ref in zip(fast, plain, exact):
        err, base_err = (got - ref).abs().max().item(), (base - ref).abs().max().item()
        assert err <= 4 * base_err + 1e-6, (err, base_err)


def test_prefix_is_bidirectional_and_the_rest_causal():
    """Trunk outputs: a prefix token changes when a later prefix patch changes; a token after the
    prefix never changes when a later patch changes."""
    model = _aim()
    x = _images(1)
    order = orders.sample("prefix:random:10-10", 1, model.grid, generator=torch.Generator().manual_seed(5))
    perm = order.perm[0]
    base = model.forward_trunk(x, order)

    def with_patch_changed(position):
        y = x.clone()
        r, c = divmod(int(perm[position]), model.grid[1])
        y[..., 2 * r:2 * r + 2, 2 * c:2 * c + 2] += 1.0
        return model.forward_trunk(y, order)

    changed = (with_patch_changed(9) - base).abs().amax(-1)[0]     # the last prefix patch
    assert (changed[:10] > 1e-6).all()                              # every prefix token sees it
    changed = (with_patch_changed(30) - base).abs().amax(-1)[0]
    assert (changed[:30] == 0).all() and (changed[30:] > 1e-6).all()


def test_loss_counts_only_non_prefix_patches():
    """Predictions of prefix patches do not enter the loss: the loss is the masked mean over
    exactly N - P targets per image, recomputed here from predict()."""
    model = _aim(norm_pix=False)
    x = _images(2)
    order = orders.sample("prefix:random", 2, model.grid, generator=torch.Generator().manual_seed(6))
    pred, valid = model.predict(x, order)
    assert torch.equal(valid.sum(1), (order.seg >= 1).sum(1))
    assert torch.equal(valid, order.ranks() >= 1)
    target = reference.patchify(x, 2)
    manual = (((pred - target) ** 2).mean(-1) * valid).sum() / valid.sum()
    torch.testing.assert_close(model(x, order), manual, rtol=1e-10, atol=1e-12)
    # and the gradient reaches no head computation made for a prefix target
    h = model.forward_trunk(x, order).detach().requires_grad_()
    out = model.forward_head(h[:, :-1], order.perm[:, 1:])
    (out * model.targets_valid(order)[..., None]).sum().backward()
    assert (h.grad[:, :-1][~model.targets_valid(order)] == 0).all()


def test_forward_features_is_bidirectional_raster():
    model = _aim()
    x = _images(2)
    feats = model.forward_features(x)
    assert feats.shape == (2, 64, 32)
    order = orders.sample("prefix:63-63", 2, model.grid, generator=torch.Generator().manual_seed(0))
    # a prefix of 63 of 64 tokens in raster order: the first 63 outputs see everything but the last patch
    y = x.clone()
    y[..., 14:, 14:] += 1.0
    assert (model.forward_features(y)[:, 0] - feats[:, 0]).abs().max() > 1e-6
    assert (model.forward_trunk(y, order)[:, 0] - model.forward_trunk(x, order)[:, 0]).abs().max() == 0


# --------------------------------------------------------------------------------------------
# Build, save/load, FLOPs, trainer preset
# --------------------------------------------------------------------------------------------
def test_build_names_save_and_load(tmp_path):
    assert {"aim_vit_tiny", "aim_vit_base", "aim_vit_large"} <= set(models.names())
    base = models.build("aim_vit_base")
    assert base.grid == (16, 16) and len(base.blocks) == 12 and len(base.head_blocks) == 12
    model = _aim().float()
    model.save_pretrained(tmp_path / "aim")
    loaded = models.from_pretrained(str(tmp_path / "aim"))
    assert type(loaded) is models.AIM
    x = _images(2).float()
    torch.testing.assert_close(loaded.forward_features(x), model.eval().forward_features(x))
    with pytest.raises(ValueError, match="head_depth"):
        models.build("aim_vit_tiny", head_depth=-1)
    with pytest.raises(ValueError, match="unknown override"):
        models.build("aim_vit_tiny", decoder_depth=2)


def test_train_flops_count_visible_pairs():
    model = _aim()
    order = orders.sample("prefix:4-4", 2, model.grid, generator=torch.Generator().manual_seed(0))
    wider = orders.sample("prefix:60-60", 2, model.grid, generator=torch.Generator().manual_seed(0))
    d, n, depth = 32, 64, 3
    pairs = lambda p: p * p + sum(range(p + 1, n + 1))                       # noqa: E731
    diff = 3 * depth * 4 * d * 2 * (pairs(60) - pairs(4))
    assert model.train_flops(wider) - model.train_flops(order) == pytest.approx(diff)


def test_aim_digits_preset_trains_and_learns(tmp_path):
    from randsac_fast.train.trainer import main
    out = tmp_path / "aim"
    main(["--preset", "aim_digits", "--steps", "40", "--log-every", "10", "--no-probe", "--workers", "0",
          "--out", str(out), "--device", "cpu"])
    from helpers import step_losses
    losses = step_losses(out)
    assert losses[40] < 0.8 * losses[10], losses
