"""Interop: timm export (checked against a small timm-style ViT forward written here, and against
timm itself when it is installed) and the import of SAIM's official checkpoints (checked against a
small re-implementation of the official model written here)."""
from __future__ import annotations

import json
import math
import os
import stat
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_close_by_rule
from randsac_fast import interop, models
from randsac_fast.orders import SegmentOrder

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Random values for every saved tensor (norms too), so a wrong mapping shows. RandSAC's
    sin-cos table is not saved (it is rebuilt from the grid), so it stays as it is."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict(keep_vars=True).values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.3 + (t == 1).to(t.dtype))
    return module


def tiny(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    extra = dict(decoder_depth=1) if name.startswith("randsac") else {}
    return models.build(name, **{**TINY, **extra, **kw}).eval()


# --------------------------------------------------------------------------------------------
# timm export
# --------------------------------------------------------------------------------------------
def timm_style_features(sd: dict, kw: dict, images: torch.Tensor) -> torch.Tensor:
    """timm VisionTransformer.forward_features, written from its definition: conv patch embed,
    [cls] + tokens + pos_embed, pre-norm blocks with a fused qkv split as (3, heads, head_dim),
    exact GELU MLP, final LayerNorm (eps 1e-6). Reads only timm's key names."""
    d, heads = kw["embed_dim"], kw["num_heads"]
    ln = lambda x, name: F.layer_norm(x, (d,), sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-6)  # noqa: E731
    lin = lambda x, name: F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])                  # noqa: E731
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=kw["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    if kw["class_token"]:
        x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + sd["pos_embed"]
    b, n, _ = x.shape
    for i in range(kw["depth"]):
        p = f"blocks.{i}"
        q, k, v = lin(ln(x, f"{p}.norm1"), f"{p}.attn.qkv").reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) * (d // heads) ** -0.5, dim=-1) @ v
        x = x + lin(att.transpose(1, 2).reshape(b, n, d), f"{p}.attn.proj")
        x = x + lin(F.gelu(lin(ln(x, f"{p}.norm2"), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
    return ln(x, "norm")


@pytest.mark.parametrize("name", ["randsac_vit_tiny", "saim_vit_tiny", "aim_vit_tiny"])
def test_to_timm_matches_timm_style_forward(name):
    model = _randomise(tiny(name), 1)
    sd, kw = interop.to_timm(model), interop.timm_kwargs(model)
    n, d = model.num_tokens, model.config.embed_dim
    prefix = 1 if name.startswith("saim") else 0
    assert sd["pos_embed"].shape == (1, prefix + n, d)
    assert ("cls_token" in sd) == bool(prefix) == kw["class_token"]
    blocks = {f"blocks.{i}.{m}.{t}" for i in range(2) for m in ("norm1", "attn.qkv", "attn.proj", "norm2",
                                                                 "mlp.fc1", "mlp.fc2") for t in ("weight", "bias")}
    assert set(sd) == blocks | {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                                "norm.bias"} | ({"cls_token"} if prefix else set())
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.forward_features(images)
        plain = timm_style_features(sd, kw, images)
        ref64 = timm_style_features({k: v.double() for k, v in sd.items()}, kw, images.double())
    assert ours.shape == ref64.shape == (2, prefix + n, d)
    assert_close_by_rule(ours, plain, ref64, what=f"{name} features vs timm-style forward")


def test_to_timm_fc_norm_and_bad_input():
    model = tiny("saim_vit_tiny")
    sd = interop.to_timm(model, fc_norm=True)
    assert "fc_norm.weight" in sd and "norm.weight" not in sd
    assert interop.timm_kwargs(model, global_pool="token")["global_pool"] == "token"
    with pytest.raises(ValueError, match="RandSAC does not have"):
        interop.timm_kwargs(tiny("randsac_vit_tiny"), global_pool="token")
    with pytest.raises(TypeError, match="RandSAC, SAIM or AIM"):
        interop.to_timm(nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["randsac_vit_tiny", "saim_vit_tiny", "aim_vit_tiny"])
def test_to_timm_loads_into_timm(name):
    timm = pytest.importorskip("timm", reason="needs timm")
    from timm.models.vision_transformer import VisionTransformer
    model = _randomise(tiny(name), 3)
    vit = VisionTransformer(**interop.timm_kwargs(model)).eval()
    vit.load_state_dict(interop.to_timm(model), strict=True)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours, theirs = model.forward_features(images), vit.forward_features(images)
        ref64 = timm_style_features({k: v.double() for k, v in interop.to_timm(model).items()},
                                    interop.timm_kwargs(model), images.double())
        pooled = vit(images)                        # num_classes=0: the pooled features
    assert_close_by_rule(ours, theirs, ref64, what=f"timm {timm.__version__}")
    prefix = model.num_prefix_tokens
    assert torch.allclose(pooled, theirs[:, prefix:].mean(1), atol=1e-6)


def test_export_cli_plain_file_and_safetensors(tmp_path, capsys, monkeypatch):
    model = _randomise(tiny("randsac_vit_tiny"), 5)
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    common = ["export", "--ckpt", str(ckpt), "--model", "randsac_vit_tiny", "--set", "num_heads=2",
              "--set", "img_size=16"]
    assert interop.main(common + ["--out", str(tmp_path / "vit.pt")]) == 0
    assert "class_token': False" in capsys.readouterr().out
    got, want = torch.load(tmp_path / "vit.pt"), interop.to_timm(model)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)

    # a plain state dict does not name its model: a clear error, and the wrong family too
    assert interop.main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.pt")]) == 1
    assert "pass --model randsac_vit_" in capsys.readouterr().err
    wrong = ["export", "--ckpt", str(ckpt), "--model", "saim_vit_tiny", "--out", str(tmp_path / "x.pt")]
    assert interop.main(wrong) == 1
    assert "a RandSAC model" in capsys.readouterr().err
    assert interop.main(["export", "--ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.pt")]) == 1
    assert "nope.pt does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()

    monkeypatch.setitem(sys.modules, "safetensors", None)           # as if not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert interop.main(common + ["--out", str(tmp_path / "vit.safetensors"), "--safetensors"]) == 1
    assert "pip install safetensors" in capsys.readouterr().err
    monkeypatch.undo()
    st = pytest.importorskip("safetensors.torch", reason="needs safetensors")
    assert interop.main(common + ["--out", str(tmp_path / "vit.safetensors"), "--safetensors"]) == 0
    got = st.load_file(str(tmp_path / "vit.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def _trainer_checkpoint(tmp_path, model, name: str, data: dict, **model_cfg):
    """A checkpoint directory as the trainer writes it: DCP shards under 'model' + meta.json."""
    import torch.distributed.checkpoint as dcp

    from randsac_fast import config as config_mod
    path = tmp_path / "checkpoints" / "step_00000010"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(path))
    mcfg = config_mod.ModelConfig(model=name, **model_cfg)
    (path / "meta.json").write_text(json.dumps({"step": 10, "config": {"model": mcfg.__dict__, "data": data}}))
    return path


@pytest.mark.parametrize("width,heads,size", [(192, 3, "tiny"), (384, 6, "small"), (768, 12, "base"),
                                              (1024, 16, "large"), (256, 4, "tiny")])
def test_timm_architecture_matches_the_size(width, heads, size):
    model = tiny("saim_vit_tiny", embed_dim=width, depth=1, num_heads=heads, query_depth=1)
    assert interop.timm_architecture(model) == f"vit_{size}_patch16_224"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_export_carries_timm_metadata(tmp_path, capsys):
    """The export writes timm's config.json beside the weights: the size's architecture name, the
    constructor arguments and pretrained_cfg with the run's mean/std and input size."""
    from safetensors.torch import load_file
    model = _randomise(tiny("randsac_vit_tiny", in_chans=1), 7)
    ckpt = _trainer_checkpoint(tmp_path, model, "randsac_vit_tiny", {"data": "digits", "mean": [0.3], "std": [0.2]},
                               img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_depth=1)
    out = tmp_path / "export"
    assert interop.main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"timm.create_model('local-dir:{out}', pretrained=True)" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["num_classes"] == 0
    assert cfg["model_args"] == json.loads(json.dumps(interop.timm_kwargs(model)))
    pre = cfg["pretrained_cfg"]
    assert pre["mean"] == [0.3] and pre["std"] == [0.2] and pre["input_size"] == [1, 16, 16]
    got, want = load_file(str(out / "model.safetensors")), interop.to_timm(model)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)

    # the run recorded no mean/std: the data set's own, as the trainer used (digits: its statistics)
    from randsac_fast import data
    ckpt2 = _trainer_checkpoint(tmp_path / "b", model, "randsac_vit_tiny", {"data": "digits"}, img_size=16,
                                patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_depth=1)
    assert interop.main(["export", "--ckpt", str(ckpt2), "--out", str(tmp_path / "vit.pt")]) == 0
    assert "vit.json" in capsys.readouterr().out
    pre = json.loads((tmp_path / "vit.json").read_text())["pretrained_cfg"]
    assert pre["mean"] == list(data.digits("test").mean) and pre["std"] == list(data.digits("test").std)

    # a plain state dict records no normalisation: 3 channels default to ImageNet's; else ask
    plain = tmp_path / "model.pt"
    torch.save(model.state_dict(), plain)
    common = ["export", "--ckpt", str(plain), "--model", "randsac_vit_tiny", "--set", "num_heads=2",
              "--set", "img_size=16", "--out", str(tmp_path / "plain")]
    assert interop.main(common) == 1
    assert "pass --mean and --std" in capsys.readouterr().err
    assert not (tmp_path / "plain").exists()
    assert interop.main(common + ["--mean", "0.5"]) == 1
    assert "together" in capsys.readouterr().err
    assert interop.main(common + ["--mean", "0.5", "--std", "0.25"]) == 0
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["pretrained_cfg"]["std"] == [0.25]


@pytest.mark.parametrize("name", ["randsac_vit_tiny", "saim_vit_tiny", "aim_vit_tiny"])
def test_export_loads_in_one_line_with_timm(tmp_path, name):
    """timm.create_model('local-dir:DIR', pretrained=True) rebuilds the encoder from the export
    alone: same features (FlashAttention rule vs float64), the run's mean/std in its data config."""
    timm = pytest.importorskip("timm", reason="needs timm")
    model = _randomise(tiny(name), 8)
    out = tmp_path / "export"
    interop.export_timm(model, str(out), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    vit = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ours, theirs = model.forward_features(images), vit.forward_features(images)
        ref64 = timm_style_features({k: v.double() for k, v in interop.to_timm(model).items()},
                                    interop.timm_kwargs(model), images.double())
    assert_close_by_rule(ours, theirs, ref64, what=f"timm {timm.__version__} local-dir")
    data_cfg = timm.data.resolve_data_config({}, model=vit)
    assert tuple(data_cfg["mean"]) == (0.4, 0.5, 0.6) and tuple(data_cfg["std"]) == (0.2, 0.25, 0.3)
    assert tuple(data_cfg["input_size"]) == (3, 16, 16)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_load_trainer_checkpoint_directory(tmp_path):
    """The trainer's layout: DCP shards under 'model' + meta.json with the training config."""
    import torch.distributed.checkpoint as dcp

    from randsac_fast import config as config_mod
    model = _randomise(tiny("saim_vit_tiny", in_chans=1, query_depth=1), 6)
    path = tmp_path / "checkpoints" / "step_00000010"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(path))
    mcfg = config_mod.ModelConfig(model="saim_vit_tiny", img_size=16, patch_size=4, embed_dim=32, depth=2,
                                  num_heads=2, query_depth=1)
    (path / "meta.json").write_text(json.dumps({"step": 10, "config": {"model": mcfg.__dict__}}))
    loaded, meta = interop.load_model(str(path))
    assert meta["step"] == 10 and loaded.in_chans == 1
    want = model.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="holds saim_vit_tiny"):
        interop.load_model(str(path), "randsac_vit_tiny")
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        interop.load_model(str(tmp_path))


# --------------------------------------------------------------------------------------------
# SAIM official import: a small re-implementation of the official model (models_saim.py)
# --------------------------------------------------------------------------------------------
class _OfficialMlp(nn.Module):
    def __init__(self, d, hidden, out):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _OfficialAttention(nn.Module):
    """Separate q, k, v projections; an additive float mask."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, xq, xkv, mask):
        b, n, d = xq.shape
        split = lambda t: t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(xq)), split(self.k(xkv)), split(self.v(xkv))
        att = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5 + mask, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, d))


class _OfficialBlock(nn.Module):
    """One block for both streams: self-attention, or queries g attending to content h (one norm1)."""

    def __init__(self, d, heads, ratio):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn, self.mlp = _OfficialAttention(d, heads), _OfficialMlp(d, int(d * ratio), d)

    def forward(self, q, kv=None, mask=None):
        kv = q if kv is None else kv
        x = q + self.attn(self.norm1(q), self.norm1(kv), mask)
        return x + self.mlp(self.norm2(x))


class _Blur(nn.Module):
    def __init__(self, channels, size, sigma):
        super().__init__()
        ax = torch.arange(size, dtype=torch.float32) - (size - 1) // 2
        kern = torch.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * sigma ** 2))
        self.register_buffer("weight", (kern / kern.sum()).expand(channels, 1, size, size).clone())

    def forward(self, x):
        return F.conv2d(x, self.weight.to(x.dtype), padding=self.weight.shape[-1] // 2, groups=x.shape[1])


class OfficialSAIM(nn.Module):
    """The official SaimViT's computation and state-dict layout (noise-ordered masks, cls first)."""

    def __init__(self, img=16, p=4, d=32, depth=2, heads=2, ratio=4.0, query_depth=2, share=False,
                 head="MLP", blur=None, loss="L2", norm_pix=True):
        super().__init__()
        n = (img // p) ** 2
        self.p, self.loss, self.norm_pix, self.step = p, loss, norm_pix, depth // query_depth
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, p, p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, d), requires_grad=False)
        self.blocks = nn.ModuleList(_OfficialBlock(d, heads, ratio) for _ in range(depth))
        self.query_blocks = self.blocks if share else nn.ModuleList(
            _OfficialBlock(d, heads, ratio) for _ in range(query_depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        out = p * p * 3
        self.prediction_head = _OfficialMlp(d, int(d * ratio), out) if head == "MLP" else nn.Linear(d, out)
        self.gaussian_blur = _Blur(3, *blur) if blur else nn.Identity()

    def masks(self, noise):
        """Content mask: token i sees j iff noise_j <= noise_i; query mask: strictly <; every row sees
        cls, the cls row sees only itself. [B, 1, 1+N, 1+N] additive."""
        b, n = noise.shape
        inf = torch.tensor(-math.inf, dtype=noise.dtype)
        h = torch.where(noise[:, :, None] < noise[:, None, :], inf, 0.0)
        g = torch.where(noise[:, :, None] <= noise[:, None, :], inf, 0.0)
        top = torch.full((b, 1, n), -math.inf, dtype=noise.dtype)
        left = torch.zeros(b, n + 1, 1, dtype=noise.dtype)
        pad = lambda m: torch.cat([left, torch.cat([top, m], 1)], 2)[:, None]  # noqa: E731
        return pad(h), pad(g)

    def forward(self, imgs, noise):
        x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        mask_h, mask_g = self.masks(noise.to(x.dtype))
        h = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], 1)
        g = self.pos_embed.expand(x.shape[0], -1, -1)
        for i, blk in enumerate(self.blocks):
            h = blk(h, mask=mask_h)
            if (i + 1) % self.step == 0:
                g = self.query_blocks[i // self.step](g, h, mask=mask_g)
        pred = self.prediction_head(self.norm(g))[:, 1:]
        b, c, hh, ww = imgs.shape
        t = self.gaussian_blur(imgs).reshape(b, c, hh // self.p, self.p, ww // self.p, self.p)
        t = torch.einsum("nchpwq->nhwpqc", t).reshape(b, -1, self.p * self.p * c)
        if self.norm_pix:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        err = (pred - t) ** 2 if self.loss == "L2" else (pred - t).abs()
        return err.mean()


CASES = {
    "separate-mlp-l2-blur": (dict(depth=2, query_depth=1, head="MLP", blur=(3, 0.8), loss="L2", norm_pix=True),
                             dict(num_heads=2)),
    "shared-linear-l1": (dict(depth=2, query_depth=2, share=True, head="LINEAR", loss="L1", norm_pix=False),
                         dict(num_heads=2, query_depth=2, loss_type="L1", norm_pix_loss=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_saim_official_import_same_loss(case):
    ctor, config = CASES[case]
    torch.manual_seed(7)
    official = _randomise(OfficialSAIM(**ctor), 8).eval()
    if ctor.get("blur"):   # the blur buffer is a fixed kernel, not a random tensor
        official.gaussian_blur = _Blur(3, *ctor["blur"])
    sd = official.state_dict()
    found = interop.saim_official_config(sd)
    assert found["embed_dim"] == 32 and found["depth"] == 2 and found["img_size"] == 16
    assert found["share_weight"] == ctor.get("share", False)
    if ctor.get("blur"):
        assert found["gaussian_kernel_size"] == 3 and math.isclose(found["gaussian_sigma"], 0.8, rel_tol=1e-5)
    ours = interop.from_saim_official(sd, **config).eval()
    assert ours.config.head == ctor["head"].lower() and ours.config.blur_kernel == (3 if ctor.get("blur") else 0)

    g = torch.Generator().manual_seed(9)
    images = torch.randn(3, 3, 16, 16, generator=g)
    noise = torch.rand(3, 16, generator=g)
    order = SegmentOrder.from_perm(noise.argsort(dim=1))     # tokens sorted by their noise
    with torch.no_grad():
        fast = ours(images, order)
        plain = official(images, noise)
        ref64 = official.double()(images.double(), noise.double())
    assert_close_by_rule(fast, plain, ref64, what=f"SAIM import {case}")
    other = SegmentOrder.from_perm(noise.argsort(dim=1).flip(1))
    with torch.no_grad():    # the loss depends on the order, so agreement above is not a coincidence
        assert abs(float(ours(images, other)) - float(ref64)) > 1e-3


def test_saim_official_import_errors_and_interpolation():
    torch.manual_seed(10)
    official = OfficialSAIM()
    sd = official.state_dict()
    with pytest.raises(ValueError, match="RandSAC model"):
        interop.from_saim_official(tiny("randsac_vit_tiny").state_dict())
    with pytest.raises(ValueError, match="already in this package's layout"):
        interop.from_saim_official(tiny("saim_vit_tiny").state_dict())
    with pytest.raises(ValueError, match="unknown SAIM argument.*decoder_depth"):
        interop.from_saim_official(sd, decoder_depth=2)
    with pytest.raises(ValueError, match="img_size=32 does not match.*img_size=16.*interpolate_pos=True"):
        interop.from_saim_official(sd, img_size=32, num_heads=2)
    with pytest.raises(ValueError, match="patch_size=8 does not match"):
        interop.from_saim_official(sd, patch_size=8, num_heads=2)
    broken = {k: v for k, v in sd.items() if k != "blocks.1.attn.v.bias"}
    with pytest.raises(ValueError, match=r"lacks blocks\.1\.attn\.v\.bias"):
        interop.from_saim_official(broken, num_heads=2)
    broken = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    with pytest.raises(ValueError, match=r"missing keys: norm\.bias, norm\.weight"):
        interop.from_saim_official(broken, num_heads=2)
    broken = dict(sd, extra=torch.zeros(1))
    with pytest.raises(ValueError, match=r"unexpected keys: extra"):
        interop.from_saim_official(broken, num_heads=2)

    big = interop.from_saim_official({"model": sd}, img_size=32, num_heads=2, interpolate_pos=True)
    assert big.grid == (8, 8) and big.pos_embed.shape == (1, 65, 32)
    assert torch.equal(big.pos_embed[:, 0], sd["pos_embed"][:, 0])          # cls row kept
    loss = big(torch.randn(1, 3, 32, 32), SegmentOrder.from_perm(torch.randperm(64)))
    assert torch.isfinite(loss)


def test_interpolate_pos_embed():
    table = torch.randn(1, 1 + 16, 8, generator=torch.Generator().manual_seed(11))
    assert torch.equal(interop.interpolate_pos_embed(table, 4, num_prefix_tokens=1), table)
    const = torch.ones(1, 16, 8) * 0.25
    out = interop.interpolate_pos_embed(const, (6, 8))
    assert out.shape == (1, 48, 8) and torch.allclose(out, torch.full_like(out, 0.25), atol=1e-6)
    with pytest.raises(ValueError, match="not a square grid"):
        interop.interpolate_pos_embed(torch.zeros(1, 12, 8), 4)


def test_load_plain_files_infer_sizes(tmp_path):
    """Sizes come from the state dict (here a shared-weight SAIM with 3 channels and depth 4), and an
    official SAIM file goes through the importer, so it exports to timm too."""
    model = _randomise(tiny("saim_vit_tiny", depth=4, share_weight=True, query_depth=4, head="linear"), 12)
    torch.save({"model": model.state_dict()}, tmp_path / "saim.pt")
    loaded, meta = interop.load_model(str(tmp_path / "saim.pt"), "saim_vit_tiny", num_heads=2)
    assert meta == {} and loaded.config.share_weight and loaded.config.depth == 4 and loaded.config.head == "linear"
    assert loaded.query_blocks is loaded.blocks
    want = model.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], want[k]) for k in want)

    torch.manual_seed(13)
    torch.save(OfficialSAIM().state_dict(), tmp_path / "official.pth")
    out = tmp_path / "official_vit.pt"
    assert interop.main(["export", "--ckpt", str(tmp_path / "official.pth"), "--set", "num_heads=2",
                         "--out", str(out)]) == 0
    got = torch.load(out)
    assert got["pos_embed"].shape == (1, 17, 32) and "cls_token" in got and "blocks.1.attn.qkv.weight" in got


def test_exported_files_get_the_umasks_mode(tmp_path):
    """safetensors writes its files 0600; exports get what any new file gets (0644 under umask 022)."""
    model = tiny("randsac_vit_tiny")
    old = os.umask(0o022)
    try:
        interop.export_timm(model, str(tmp_path / "dir"), (0.5,) * 3, (0.25,) * 3)
        interop.export_timm(model, str(tmp_path / "vit.safetensors"), (0.5,) * 3, (0.25,) * 3)
        model.save_pretrained(str(tmp_path / "pre"))
    finally:
        os.umask(old)
    for path in (tmp_path / "dir" / "model.safetensors", tmp_path / "vit.safetensors", tmp_path / "pre" / "model.safetensors"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path
