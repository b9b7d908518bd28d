"""The data pipeline: the uint8 / DCT-downscaled crop path, workers, tar shards, make-shards."""
import io
import json
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from randsac_fast import data

PIL = pytest.importorskip("PIL", reason="needs pillow")
from PIL import Image  # noqa: E402


def _textured(h: int, w: int, seed: int) -> np.ndarray:
    """uint8 [h, w, 3]: smooth colour fields plus fine texture, so a shifted crop shows up."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.rand(1, 3, h // 8, w // 8, generator=g), size=(h, w), mode="bicubic")[0]
    img = 0.7 * low + 0.3 * torch.rand(3, h, w, generator=g)
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def _jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _pil_decode(blob: bytes, factor: int = 1) -> np.ndarray:
    im = Image.open(io.BytesIO(blob))
    if factor > 1:
        im.draft("RGB", (im.width // factor, im.height // factor))
    return np.asarray(im.convert("RGB"))


def _errors(decoded: np.ndarray, box, out: int, fast: torch.Tensor):
    """Max abs error (in uint8 levels) of Pillow's bicubic resize of ``box`` and of ``fast``, both
    against the float64 resize of the same pixels."""
    top, left, h, w = box
    crop = torch.from_numpy(decoded[top:top + h, left:left + w].copy()).permute(2, 0, 1).double()
    ref = F.interpolate(crop[None], size=(out, out), mode="bicubic", antialias=True, align_corners=False)[0]
    ref = ref.clamp(0, 255)
    pil = Image.fromarray(decoded).resize((out, out), Image.BICUBIC, box=(left, top, left + w, top + h))
    pil = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).double()
    return float((pil - ref).abs().max()), float((fast.double() - ref).abs().max())


# ---- the per-image path -----------------------------------------------------------------------
def test_simplejpeg_and_pillow_decode_the_same_pixels(monkeypatch):
    pytest.importorskip("simplejpeg", reason="needs simplejpeg")
    blob = _jpeg(_textured(75, 100, 0))
    for factor in (1, 2, 4):
        monkeypatch.delenv("RANDSAC_FAST_JPEG", raising=False)
        fast = data.EncodedImage(blob, "x.jpg")
        assert fast.decoder == "simplejpeg"
        monkeypatch.setenv("RANDSAC_FAST_JPEG", "pillow")
        slow = data.EncodedImage(blob, "x.jpg")
        assert slow.decoder == "pillow"
        assert np.array_equal(fast.decode(factor), slow.decode(factor))     # bitwise: resume is exact either way
        assert np.array_equal(fast.decode(factor), _pil_decode(blob, factor))


def test_fast_path_gives_the_plain_paths_crops():
    """Same seed -> same box as the float path on the fully decoded image; the uint8 resize is as
    close to the float64 resize as Pillow's own (torchvision's PIL path) is."""
    blob = _jpeg(_textured(120, 160, 1))
    decoded = _pil_decode(blob)
    plain_in = torch.from_numpy(decoded.copy()).permute(2, 0, 1).float() / 255
    fast_aug = data.Augment(64, (0.2, 1.0), (3 / 4, 4 / 3), False, (0.0,) * 3, (1.0,) * 3, normalize=False)
    plain_aug = data.Augment(64, (0.2, 1.0), (3 / 4, 4 / 3), False, (0.0,) * 3, (1.0,) * 3)
    for seed in range(6):
        fast = fast_aug(data.EncodedImage(blob, "x.jpg"), torch.Generator().manual_seed(seed))
        plain = plain_aug(plain_in, torch.Generator().manual_seed(seed))
        assert fast.dtype == torch.uint8 and fast.shape == (3, 64, 64)
        box = data.crop_box(120, 160, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(seed))
        assert data.dct_factor(box[2], box[3], 64) == 1            # 64 px from a 120 px image: no reduction
        err_pil, err_fast = _errors(decoded, box, 64, fast)
        assert err_fast <= 2 * err_pil + 1e-9, (seed, err_fast, err_pil)
        # the float path (the old one) agrees within uint8 rounding plus bicubic overshoot clamping
        err_plain = _errors(decoded, box, 64, (plain * 255).clamp(0, 255))[1]
        assert err_plain < 1e-3 and (fast.float() - (plain * 255).clamp(0, 255)).abs().max() <= err_fast + 1e-3
    # flips come from the same generator, after the box
    flip_aug = data.Augment(64, (0.2, 1.0), (3 / 4, 4 / 3), True, (0.0,) * 3, (1.0,) * 3, normalize=False)
    flips = 0
    for seed in range(8):
        a = flip_aug(data.EncodedImage(blob, "x.jpg"), torch.Generator().manual_seed(seed))
        b = fast_aug(data.EncodedImage(blob, "x.jpg"), torch.Generator().manual_seed(seed))
        flips += not torch.equal(a, b)
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
    assert 0 < flips < 8


def test_dct_downscaled_crop_matches_pillow_draft():
    """A box 4x larger than the output is decoded at 1/4 scale; on a box aligned to that grid the
    crop is the same pixels Pillow's draft decode gives, resized within Pillow's own error."""
    blob = _jpeg(_textured(480, 640, 2))
    img = data.EncodedImage(blob, "big.jpg")
    box = (40, 80, 320, 288)                                        # top, left, h, w: multiples of 4
    assert data.dct_factor(box[2], box[3], 64) == 4
    crop = img.crop(*box, out=64)
    assert tuple(crop.shape) == (3, 80, 72)                          # >= the output on both sides
    quarter = _pil_decode(blob, 4)
    assert quarter.shape[:2] == (120, 160)
    small = (10, 20, 80, 72)
    assert torch.equal(crop, torch.from_numpy(quarter[10:90, 20:92].copy()).permute(2, 0, 1))
    err_pil, err_fast = _errors(quarter, small, 64, data.resize(crop, 64))
    assert err_fast <= 2 * err_pil + 1e-9


# ---- workers and exact resume -----------------------------------------------------------------
def _folder(root, n: int, classes: int = 3, size=(40, 48), broken: bool = False):
    for k in range(n):
        d = root / f"c{k % classes}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{k:03d}.jpg").write_bytes(_jpeg(_textured(*size, 100 + k)))
    if broken:   # a truncated JPEG: the header is fine, the data end early
        good = _jpeg(_textured(*size, 999))
        (root / "c0" / "broken.jpg").write_bytes(good[: len(good) // 2])
    return str(root)


def _take(stream, n):
    out = [next(stream) for _ in range(n)]
    stream.close()
    return out


def test_two_workers_resume_at_the_exact_micro_batch(tmp_path):
    src = data.open_source(_folder(tmp_path, 20), 16)
    aug = data.Augment(16, (0.3, 1.0), (3 / 4, 4 / 3), True, data.IMAGENET_MEAN, data.IMAGENET_STD, normalize=False)
    ds, sb = data.AugmentedDataset(src, aug, seed=3), data.ShardedBatches(len(src), 4, 0, 1, seed=3)
    ref = _take(data.batch_stream(ds, sb, 0, 0, False), 8)           # 5 per epoch: crosses a boundary
    two = _take(data.batch_stream(ds, sb, 0, 2, False), 8)
    resumed = _take(data.batch_stream(ds, sb, 3, 2, False), 5)
    for k in range(8):
        assert torch.equal(two[k][0], ref[k][0]) and torch.equal(two[k][1], ref[k][1])
    for k in range(3, 8):
        assert torch.equal(resumed[k - 3][0], ref[k][0])
    assert ref[0][0].dtype == torch.uint8
    # normalisation on the "device" (here the CPU) is the per-sample float path's
    norm = data.batch_stream(ds, sb, 0, 0, False, device=torch.device("cpu"), norm=(data.IMAGENET_MEAN, data.IMAGENET_STD))
    assert torch.allclose(next(norm)[0], data.normalize(ref[0][0], data.IMAGENET_MEAN, data.IMAGENET_STD))


def test_workers_auto_rule_and_bad_value():
    assert data.auto_workers(cores=2, local_ranks=1) == 1
    assert data.auto_workers(cores=2, local_ranks=2) == 0
    assert data.auto_workers(cores=96, local_ranks=8) == 11
    assert data.auto_workers(cores=256, local_ranks=1) == 16
    assert data.resolve_workers("3") == 3 and data.resolve_workers(0) == 0
    with pytest.raises(ValueError, match=r"--workers must be auto or a whole number >= 0; got 'many'"):
        data.resolve_workers("many")


# ---- tar shards ---------------------------------------------------------------------------------
wds = pytest.importorskip("webdataset", reason="needs webdataset")


def test_make_shards_round_trip(tmp_path, capsys):
    from randsac_fast.data.__main__ import main
    folder = _folder(tmp_path / "folder", 11)
    out = tmp_path / "shards"
    assert main(["make-shards", folder, str(out), "--shard-size", "4"]) == 0
    pattern = capsys.readouterr().out.split("--data '")[1].split("'")[0]
    assert pattern == str(out / "train-{000000..000002}.tar")
    assert json.loads((out / "sizes.json").read_text()) == {"train-000000.tar": 4, "train-000001.tar": 4,
                                                            "train-000002.tar": 3}
    src = data.open_source(pattern, 16)
    files = data.ImageFolderSource(folder).files
    expected = sorted((open(p, "rb").read(), lb) for p, lb in files)
    got = sorted((s["jpg"], int(s["cls"])) for k in range(3) for _, s in src.records(k))
    assert len(src) == 11 and got == expected                        # every file once, byte for byte
    assert main(["make-shards", folder, str(out)]) == 1                 # nothing written is overwritten
    assert "already holds train-*.tar" in capsys.readouterr().err


def _shard_stream(pattern, batch, rank, world, start, workers, seed=0):
    src = data.open_source(pattern, 16)
    aug = data.Augment(16, (0.3, 1.0), (3 / 4, 4 / 3), True, data.IMAGENET_MEAN, data.IMAGENET_STD, normalize=False)
    ds, sb = data.AugmentedDataset(src, aug, seed), data.ShardedBatches(len(src), batch, rank, world, seed)
    return data.batch_stream(ds, sb, start, workers, False)


def test_shard_stream_splits_and_resumes_exactly(tmp_path):
    folder = _folder(tmp_path / "folder", 30, classes=30)              # the label names the image
    pattern = data.make_shards(folder, str(tmp_path / "shards"), shard_size=4)
    # one rank, no workers: an epoch is every record once, in a seeded shuffled order
    epoch0 = _take(_shard_stream(pattern, 3, 0, 1, 0, 0), 10)
    labels = torch.cat([b[1] for b in epoch0]).tolist()
    assert sorted(labels) == list(range(30)) and labels != sorted(labels)
    # ranks and workers get disjoint shards that cover the set
    src = data.open_source(pattern, 16)
    sets = [data.ShardDataset(src, None, 0, data.ShardedBatches(30, 3, r, 2, 0), 0, 2)._shards(1, w, 2)
            for r in range(2) for w in range(2)]
    assert sorted(s for part in sets for s in part) == list(range(8))
    # two workers: resumed mid-stream (past an epoch end of some worker) = uninterrupted, bitwise
    ref = _take(_shard_stream(pattern, 3, 0, 1, 0, 2), 14)
    resumed = _take(_shard_stream(pattern, 3, 0, 1, 9, 2), 5)
    for k in range(9, 14):
        assert torch.equal(resumed[k - 9][0], ref[k][0]) and torch.equal(resumed[k - 9][1], ref[k][1])
    stream = _shard_stream(pattern, 3, 0, 1, 0, 2)
    state = stream.state(9)
    stream.close()
    assert state["kind"] == "shards" and state["workers"] == 2 and len(state["rank0_workers"]) == 2


def test_resuming_a_shard_stream_with_another_layout_warns(tmp_path):
    folder = _folder(tmp_path / "folder", 12, classes=12)
    pattern = data.make_shards(folder, str(tmp_path / "shards"), shard_size=3)
    states = {}
    for workers in (1, 2):
        stream = _shard_stream(pattern, 3, 0, 1, 0, workers)
        states[workers] = stream.state(3)
        stream.close()
    assert data.resume_changes(None, states[2]) == []                       # not a resume
    assert data.resume_changes(states[2], states[2]) == []                  # same layout: exact, silent
    assert data.resume_changes({"kind": "indexed", "micro": 3}, states[2]) == []
    (line,) = data.resume_changes(states[1], states[2])
    assert "--workers per rank 1 -> 2" in line and "epoch 0" in line and "checkpoint's values" in line
    other = dict(states[2], world=2, batch_size=6)
    (line,) = data.resume_changes(other, states[2])
    assert "ranks 2 -> 1" in line and "per-rank batch 6 -> 3" in line


def test_corrupt_image_inside_a_shard_is_skipped_and_counted(tmp_path):
    folder = _folder(tmp_path / "folder", 6, broken=True)
    pattern = data.make_shards(folder, str(tmp_path / "shards"), shard_size=10)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        images, labels, skipped = _take(_shard_stream(pattern, 7, 0, 1, 0, 0), 1)[0]
    assert skipped == 1 and images.shape == (6, 3, 16, 16)
    assert any("skipping unreadable image" in str(x.message) and "train-000000.tar" in str(x.message) for x in w)


def test_shard_errors_are_one_clear_line(tmp_path, monkeypatch):
    with pytest.raises(data.DataError, match=r"shards of --data .* do not exist \(first: .*train-000001.tar\)"):
        folder = _folder(tmp_path / "folder", 3)
        data.make_shards(folder, str(tmp_path / "s"), shard_size=3)
        data.open_source(str(tmp_path / "s" / "train-{000000..000001}.tar"), 16)
    monkeypatch.setitem(__import__("sys").modules, "webdataset", None)
    with pytest.raises(data.DataError, match=r"tar shards need the webdataset library: pip install webdataset"):
        data.open_source(str(tmp_path / "s" / "train-{000000..000000}.tar"), 16)


# ---- the trainer reports input-bound steps ------------------------------------------------------
def test_trainer_logs_data_wait_and_warns_once(tmp_path, monkeypatch, capsys):
    import time
    from randsac_fast.train import main
    real = data.AugmentedDataset.__getitem__

    def slow(self, key):             # a loader far slower than the tiny model's step
        time.sleep(0.02)
        return real(self, key)
    monkeypatch.setattr(data.AugmentedDataset, "__getitem__", slow)
    out = tmp_path / "run"
    assert main(["--img-size", "8", "--patch-size", "2", "--embed-dim", "16", "--depth", "1", "--num-heads", "1",
                 "--decoder-depth", "1", "--decoder-num-heads", "1", "--order", "square:4", "--batch-size", "16",
                 "--probe", "false", "--steps", "4", "--log-every", "1", "--workers", "0", "--out", str(out)]) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 4
    for r in recs:
        assert r["data_wait_s"] >= 16 * 0.02 and 0.0 < r["data_wait_frac"] <= 1.0
    err = capsys.readouterr().err
    # Once, and only when a record after the first (the workers' start-up) is over 10%: on an idle
    # machine the tiny model's step is far shorter than the 0.3 s wait, so it does warn there.
    input_bound = any(r["data_wait_frac"] > 0.1 for r in recs[1:])
    assert err.count("of the step time went to waiting for data with --workers 0") == int(input_bound)
    assert "data-wait" in err


def test_trainer_warns_when_a_shard_run_resumes_with_other_workers(tmp_path, capsys):
    from randsac_fast.train import main
    pattern = data.make_shards(_folder(tmp_path / "folder", 16), str(tmp_path / "shards"), shard_size=4)
    out = tmp_path / "run"
    base = ["--data", pattern, "--img-size", "8", "--patch-size", "2", "--embed-dim", "16", "--depth", "1",
            "--num-heads", "1", "--decoder-depth", "1", "--decoder-num-heads", "1", "--order", "square:4",
            "--batch-size", "4", "--probe", "false", "--log-every", "1", "--ckpt-every", "2", "--out", str(out)]
    assert main([*base, "--steps", "2", "--workers", "0"]) == 0
    capsys.readouterr()
    assert main([*base, "--steps", "4", "--workers", "1", "--resume", "latest", "--allow-changed"]) == 0
    assert "resuming the shard stream" not in "".join(capsys.readouterr())   # same layout: exact, silent
    assert main([*base, "--steps", "6", "--workers", "2", "--resume", "latest", "--allow-changed"]) == 0
    out_err = "".join(capsys.readouterr())
    assert "resuming the shard stream with --workers per rank 1 -> 2" in out_err
