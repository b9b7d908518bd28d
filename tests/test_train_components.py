"""Trainer components on one process: config/CLI, schedule, data, checkpoints, loss checks."""
import os
import warnings

import pytest
import torch

from randsac_fast import config, data
from randsac_fast.runtime import schedule
from randsac_fast.runtime.checkpoint import Checkpointer
from helpers import tiny_model_and_optimizer


# ---- config / CLI ------------------------------------------------------------------------------
def test_preset_then_flags():
    cfg = config.parse_args(["--preset", "saim_in1k_vitb", "--batch-size", "8", "--betas", "0.9,0.99",
                             "--clip-grad", "none", "--hflip", "false"])
    assert cfg.model.model == "saim_vit_base" and cfg.model.blur_kernel == 9 and cfg.optim.blr == 2e-4
    assert cfg.train.batch_size == 8 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.optim.clip_grad is None and cfg.data.hflip is False
    assert config.parse_args([]).preset == "digits"


@pytest.mark.parametrize("argv, needle", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--no-such-field", "1"], "unrecognized arguments: --no-such-field"),
    (["--batch-size", "big"], "--batch-size: expected int, got 'big'"),
    (["--betas", "0.9"], "--betas: expected 2 comma-separated values, got '0.9'"),
    (["--ac", "maybe"], "--ac: expected true or false, got 'maybe'"),
])
def test_bad_cli_is_one_clear_error(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_args(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        config.parse_args(["--help"])
    out = capsys.readouterr().out
    for sec, f in config._fields(config.Config()):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Hua et al." in out and "Qi et al." in out       # presets cite their sources


# ---- schedule ----------------------------------------------------------------------------------
def test_warmup_then_cosine():
    lrs = [schedule.lr_at(s, 100, 10, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))            # rising during warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))            # then never rising
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5)                  # half way down the cosine
    assert schedule.scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


# ---- data --------------------------------------------------------------------------------------
def test_crop_is_deterministic_and_within_scale():
    aug = data.Augment(16, (0.3, 0.6), (3 / 4, 4 / 3), True, (0.0,), (1.0,))
    img = torch.rand(1, 40, 40)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(aug(img, g1), aug(img, g2))
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = data.crop_box(40, 40, (0.3, 0.6), (3 / 4, 4 / 3), g)
        assert 0.3 * 1600 * 0.9 <= h * w <= 0.6 * 1600 * 1.1            # rounding slack only
        assert 0 <= top <= 40 - h and 0 <= left <= 40 - w


def test_shards_are_disjoint_equal_and_reproducible():
    shards = [data.ShardedBatches(103, 10, r, 3, seed=1) for r in range(3)]
    seen = [[i for b in s.epoch(2) for _, i in b] for s in shards]
    assert all(len(x) == 30 for x in seen)                               # same length on every rank
    assert len(set(seen[0]) | set(seen[1]) | set(seen[2])) == 90         # disjoint
    assert seen[0] == [i for b in shards[0].epoch(2) for _, i in b]     # reproducible
    assert seen[0] != [i for b in shards[0].epoch(3) for _, i in b]     # reshuffled per epoch


def test_stream_resumes_mid_epoch():
    src = data.digits("train")
    aug = data.Augment(8, (0.5, 1.0), (3 / 4, 4 / 3), True, (0.3,), (0.4,))
    ds, sb = data.AugmentedDataset(src, aug, seed=0), data.ShardedBatches(len(src), 32, 0, 1, seed=0)
    full = data.batch_stream(ds, sb, 0, 0, False)
    ref = [next(full)[0] for _ in range(sb.per_epoch + 2)]               # crosses an epoch boundary
    resumed = data.batch_stream(ds, sb, sb.per_epoch - 1, 0, False)
    for k in range(sb.per_epoch - 1, sb.per_epoch + 2):
        assert torch.equal(next(resumed)[0], ref[k])


def test_missing_and_empty_data_dir(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.open_source(str(tmp_path / "nope"), 32)
    with pytest.raises(data.DataError, match="is empty"):
        data.open_source(str(tmp_path), 32)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("x")
    with pytest.raises(data.DataError, match="holds no images"):
        data.open_source(str(tmp_path), 32)


def test_corrupt_image_is_skipped_with_a_named_warning(tmp_path):
    pytest.importorskip("PIL", reason="needs pillow")
    from PIL import Image
    (tmp_path / "a").mkdir()
    for k in range(3):
        Image.fromarray((torch.rand(20, 24, 3) * 255).byte().numpy()).save(tmp_path / "a" / f"{k}.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    src = data.open_source(str(tmp_path), 16)
    aug = data.Augment(16, (0.5, 1.0), (3 / 4, 4 / 3), True, data.IMAGENET_MEAN, data.IMAGENET_STD)
    ds = data.AugmentedDataset(src, aug, seed=0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        images, labels, skipped = data.collate([ds[(0, i)] for i in range(len(src))])
    assert skipped == 1 and images.shape == (3, 3, 16, 16)
    assert any("broken.png" in str(x.message) for x in w)


def test_cifar_pickles(tmp_path):
    import pickle
    import numpy as np
    for i in range(1, 6):
        batch = {b"data": np.full((2, 3072), i, np.uint8), b"labels": [i, i]}
        (tmp_path / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    src = data.open_source(str(tmp_path), 32)
    assert src.name == "cifar10" and len(src) == 10 and src.load(9).shape == (3, 32, 32)
    assert src.label(9) == 5 and float(src.load(9)[0, 0, 0]) == pytest.approx(5 / 255)


# ---- checkpoints (one process group of size 1) --------------------------------------------------


def test_interrupted_save_keeps_previous_checkpoint(group, tmp_path, monkeypatch):
    import randsac_fast.runtime.checkpoint as ck
    model, opt = tiny_model_and_optimizer()
    cp = Checkpointer(str(tmp_path), keep=2, rank=0, world=1)
    good = cp.save(1, model, opt, {"micro": 1}, {"x": 1})
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    real_save = ck.dcp.save
    def crash_midway(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)   # shards are written ...
        raise KeyboardInterrupt("killed while saving")  # ... but the save never commits
    monkeypatch.setattr(ck.dcp, "save", crash_midway)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        cp.save(2, model, opt, {"micro": 2}, {"x": 2})
    assert os.path.isdir(tmp_path / "checkpoints" / ".tmp_step_00000002")   # the debris is there
    assert cp.resolve("latest") == good                                       # but never chosen
    meta, state = cp.load(cp.resolve("latest"), model, opt)
    assert meta["step"] == 1 and state == {"x": 1}
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])

    monkeypatch.setattr(ck.dcp, "save", real_save)
    for step in (3, 4, 5):
        cp.save(step, model, opt, {"micro": step}, {})
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["step_00000004", "step_00000005"]                       # keep=2, debris gone


def test_resume_path_must_be_a_checkpoint(tmp_path):
    cp = Checkpointer(str(tmp_path), keep=1, rank=0, world=1)
    assert cp.resolve("latest") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        cp.resolve(str(tmp_path))


def test_non_finite_loss_names_step_and_checkpoint(group):
    from randsac_fast.train import Trainer, TrainingError

    class Fake:
        dist = type("D", (), {"world": 1})()
        last_ckpt = "runs/x/checkpoints/step_00000010"
    pending = [(11, torch.tensor(1.0)), (12, torch.tensor(float("nan")))]
    with pytest.raises(TrainingError, match=r"at step 12.*step_00000010"):
        Trainer._check_losses(Fake(), pending)
