"""save_pretrained / from_pretrained: a directory of config.json + model.safetensors rebuilds the
model exactly (same weights, same loss for the same order), offline, in one line."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from randsac_fast import interop, models, orders
from randsac_fast.models import SAIM, RandSAC

TINY = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
CASES = {
    "randsac_skip": ("randsac_vit_tiny", dict(decoder_depth=1, skip_memory=True, norm_pix=False)),
    "saim": ("saim_vit_tiny", dict(query_depth=1, blur_kernel=3)),
    "saim_shared": ("saim_vit_tiny", dict(share_weight=True, head="linear")),
}


def _model(case: str):
    name, extra = CASES[case]
    torch.manual_seed(0)
    model = models.build(name, **TINY, **extra)
    with torch.no_grad():                      # weights unlike a fresh init, so a lost tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _loss(model, order_spec: str):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 1, 16, 16, generator=g)
    order = orders.sample(order_spec, batch=2, grid=model.grid, generator=g)
    with torch.no_grad():
        return model(images, order)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(tmp_path, case):
    model = _model(case)
    path = model.save_pretrained(tmp_path / "m", metadata={"mean": [0.5], "std": [0.25]})
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model_type"] == type(model).__name__ and saved["config"]["embed_dim"] == 32
    loaded = models.from_pretrained(path)                     # the class comes from config.json
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config == model.config and loaded.pretrained_metadata == {"mean": [0.5], "std": [0.25]}
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    if model.config.__dict__.get("share_weight"):
        assert loaded.query_blocks is loaded.blocks or all(
            a is b for a, b in zip(loaded.query_blocks.parameters(), loaded.blocks.parameters()))
    spec = "random" if isinstance(model, SAIM) else "square:4"
    assert torch.equal(_loss(loaded, spec), _loss(model, spec))
    again = type(model).from_pretrained(str(path), backend="reference")   # an override
    assert again.config.backend == "reference"


def test_errors_name_the_fix(tmp_path, monkeypatch):
    model = _model("saim")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="holds a SAIM model, not RandSAC"):
        RandSAC.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="overrides"):
        SAIM.from_pretrained(tmp_path / "m", no_such_field=1)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "meta.json").write_text("{}")
    with pytest.raises(ValueError, match=r"trainer checkpoint .*interop.load_model"):
        models.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="not a save_pretrained directory"):
        models.from_pretrained(str(tmp_path / "nothing"))
    # weights that do not fit the config (a truncated or edited directory)
    from safetensors.torch import load_file, save_file
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    weights.pop("norm.weight")
    save_file(weights, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['norm.weight'\]"):
        models.from_pretrained(tmp_path / "m")
    # a hub repo id needs huggingface_hub
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        models.from_pretrained("someone/randsac-tiny")


def test_hub_repo_id_downloads_then_loads(tmp_path, monkeypatch):
    """A repo id goes through huggingface_hub.snapshot_download (stubbed: no network here)."""
    model = _model("randsac_skip")
    model.save_pretrained(tmp_path / "snapshot")
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(tmp_path / "snapshot")
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    loaded = models.from_pretrained("someone/randsac-tiny")
    assert calls == [("someone/randsac-tiny", ("config.json", "model.safetensors"))]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_pretrained_cli_from_a_state_dict_file(tmp_path, capsys):
    model = _model("randsac_skip")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    argv = ["pretrained", "--ckpt", str(tmp_path / "model.pt"), "--model", "randsac_vit_tiny", "--set", "num_heads=2",
            "--set", "img_size=16", "--set", "norm_pix=False", "--out", str(tmp_path / "out")]
    assert interop.main(argv) == 1                       # one channel, no recorded normalisation
    assert "pass --mean and --std" in capsys.readouterr().err
    assert interop.main(argv + ["--mean", "0.5", "--std", "0.25"]) == 0
    assert f"models.from_pretrained('{tmp_path / 'out'}')" in capsys.readouterr().out
    loaded = models.from_pretrained(tmp_path / "out")
    assert loaded.pretrained_metadata["mean"] == [0.5]
    assert torch.equal(_loss(loaded, "square:4"), _loss(model, "square:4"))
