"""Defaults that fit the run: the method's recipe follows --model, your own images start from the
folder preset, a warm-up longer than half the run is scaled (with a warning line)."""
from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch

from randsac_fast import config, train
from randsac_fast.runtime.schedule import fit_warmup, lr_at

TINY_SAIM = ["--model", "saim_vit_tiny", "--embed-dim", "32", "--depth", "2", "--num-heads", "2"]
TINY = ["--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--decoder-depth", "1", "--decoder-num-heads", "2"]


@pytest.fixture(autouse=True)
def _no_process_group_left():
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _train(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = train.main([*argv, "--workers", "0", "--no-probe"])
    return code, err.getvalue()


def test_saim_model_without_preset_trains_with_saims_recipe(tmp_path):
    out = tmp_path / "saim"
    code, err = _train([*TINY_SAIM, "--steps", "1", "--batch-size", "8", "--out", str(out)])
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["order"] == "random"                         # not the digits demo's square:4
    assert (saved["model"]["blur_kernel"], saved["model"]["blur_sigma"], saved["model"]["norm_pix"]) == (9, 1.0, True)
    assert saved["data"]["crop_scale"] == [0.67, 1.0] and saved["data"]["hflip"] is True
    assert saved["model"]["decoder_depth"] is None                     # the demo's RandSAC decoder is dropped
    notes = [l for l in err.splitlines() if l.startswith("--model saim_vit_tiny: preset digits")]
    assert len(notes) == 1 and "order square:4 -> random" in notes[0]
    # The recorded config reproduces the same recipe (every field in it counts as given).
    again = config.parse_args(["--config", str(out / "config.json")])
    assert again.train.order == "random" and again.model.blur_kernel == 9


def test_a_preset_of_the_other_family_gives_way_in_one_line():
    cfg = config.parse_args(["--preset", "randsac_cifar10_square", "--model", "saim_vit_small"])
    assert (cfg.train.order, cfg.model.blur_kernel, cfg.data.crop_scale) == ("random", 9, (0.67, 1.0))
    assert cfg.model.decoder_depth is None
    assert len(cfg.notes) == 1 and "randsac_cifar10_square was written for randsac_vit_tiny" in cfg.notes[0]
    # The same family keeps the preset's method settings; only sizes go back to the model's own.
    cfg = config.parse_args(["--preset", "randsac_cifar10_square", "--model", "randsac_vit_small"])
    assert cfg.train.order == "square:16/4" and cfg.model.decoder_depth is None
    # What the user sets is kept.
    cfg = config.parse_args(["--model", "saim_vit_tiny", "--order", "raster", "--no-hflip"])
    assert (cfg.train.order, cfg.data.hflip, cfg.model.blur_kernel) == ("raster", False, 9)
    # No --model: the preset as written, no note.
    assert config.parse_args(["--preset", "saim_in1k_vitb"]).notes == []


def test_a_shrunk_model_is_named_by_its_size():
    cfg = config.parse_args(["--preset", "saim_in1k_vitb", "--embed-dim", "192", "--num-heads", "3"])
    assert cfg.model.model == "saim_vit_tiny" and "recorded as saim_vit_tiny" in cfg.notes[0]
    cfg = config.parse_args(["--preset", "saim_in1k_vitb", "--depth", "4", "--query-depth", "4"])
    assert cfg.model.model == "saim_vit_base" and "a custom size" in cfg.notes[0]


def test_the_warmup_flag_given_wins_over_the_presets():
    assert config.parse_args([]).optim.warmup_steps == 20                       # digits preset
    o = config.parse_args(["--warmup-epochs", "1"]).optim
    assert (o.warmup_steps, o.warmup_frac, o.warmup_epochs) == (None, None, 1.0)
    o = config.parse_args(["--preset", "folder", "--warmup-steps", "3"]).optim
    assert (o.warmup_steps, o.warmup_frac) == (3, None)
    assert config.parse_args(["--preset", "folder"]).optim.warmup_frac == 0.05


def test_fit_warmup():
    assert fit_warmup(10, 20, "x") == (10, None)
    steps, line = fit_warmup(20, 20, "--warmup-steps 20")
    assert steps == 2 and line.startswith("warning: a warm-up of 20 steps (--warmup-steps 20)") and "\n" not in line


def test_a_short_run_with_the_default_warmup_is_scaled_with_a_warning(tmp_path):
    out = tmp_path / "short"
    code, err = _train([*TINY, "--steps", "20", "--batch-size", "16", "--log-every", "1", "--out", str(out)])
    assert code == 0
    warn = [l for l in err.splitlines() if "warm-up of 20 steps" in l]
    assert len(warn) == 1 and "using 2 steps" in warn[0]
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    peak = 8e-3 * 16 / 256
    assert lrs[2] == pytest.approx(peak) and lrs[2] == pytest.approx(lr_at(1, 20, 2, peak))   # peak reached at step 2
    assert lrs[20] < lrs[10] < peak                                                           # then the cosine decay


def test_missing_pillow_is_one_line_before_any_worker_starts(tmp_path, monkeypatch):
    import sys
    import tomllib
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml"), "rb") as fh:
        deps = tomllib.load(fh)["project"]["dependencies"]
    assert any(d.lower().startswith("pillow") for d in deps)             # installed with the package
    from PIL import Image
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "data" / cls)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / cls / "0.png")
    monkeypatch.setitem(sys.modules, "PIL", None)                        # `from PIL import Image` fails
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = train.main(["--data", str(tmp_path / "data"), *TINY, "--img-size", "8", "--patch-size", "2",
                           "--batch-size", "2", "--steps", "1", "--workers", "2", "--out", str(tmp_path / "run")])
    err = err.getvalue()
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: image files need Pillow") and "pip install pillow" in lines[-1]
    assert "Traceback" not in err and "DataLoader worker" not in err
