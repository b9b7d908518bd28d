"""Every value a user can type is refused with one line naming it and the fix: no traceback, no
silent wrong result. CLIs are driven through ``main(argv)``; public ops directly."""
import os
import pickle

import numpy as np
import pytest
import torch

from randsac_fast import config, data, interop, models, ops, viz
from randsac_fast.eval import finetune, linprobe
from randsac_fast.train import trainer


def _run(main, argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:          # argparse: usage errors exit with code 2
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_line_error(main, argv, capsys, *needles):
    rc, err = _run(main, argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc not in (0, None), f"{argv}: exit code {rc}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"{argv}: stderr is not one line:\n{err}"
    for needle in needles:
        assert needle in lines[0], f"{argv}: {needle!r} not in {lines[0]!r}"
    return lines[0]


# --------------------------------------------------------------------------------------------
# Config: every field declares a rule; the train CLI
# --------------------------------------------------------------------------------------------
def test_every_config_field_has_a_rule():
    fields = {f.name for _, f in config._fields(config.Config())}
    assert set(config.RULES) == fields


@pytest.mark.parametrize("preset", list(config.PRESETS))
def test_presets_validate(preset):
    config.validate(config.parse_args(["--preset", preset]))


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    return str(path)


TRAIN_BAD = [
    (["--steps", "0"], "--steps 0: must be an integer >= 1"),
    (["--steps", "-5"], "--steps -5: must be an integer >= 1"),
    (["--log-every", "0"], "--log-every 0: must be an integer >= 1"),
    (["--ckpt-every", "-1"], "--ckpt-every -1: must be an integer >= 0"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1: must be a finite number >= 0"),
    (["--warmup-steps", "-3"], "--warmup-steps -3: must be an integer >= 0"),
    (["--warmup-epochs", "-1"], "--warmup-epochs -1.0: must be a finite number >= 0"),
    (["--std", "0"], "--std 0.0: must be comma-separated values, each a finite number > 0"),
    (["--std", "0.2,0.2,inf"], "--std 0.2,0.2,inf: must be"),
    (["--mean", "nan"], "--mean nan: must be"),
    (["--blr", "nan"], "--blr nan: must be a finite number > 0"),
    (["--blr", "inf"], "--blr inf: must be a finite number > 0"),
    (["--blr", "0"], "--blr 0.0: must be a finite number > 0"),
    (["--clip-grad", "0"], "--clip-grad 0.0: must be a finite number > 0, or none"),
    (["--crop-scale", "0.5,0.2"], "--crop-scale 0.5,0.2: must be two values a,b with 0 < a <= b <= 1"),
    (["--crop-ratio", "0,1"], "--crop-ratio 0.0,1.0: must be two values a,b with 0 < a <= b"),
    (["--betas", "0.9,1.0"], "--betas 0.9,1.0: must be 2 comma-separated values, each a number in [0, 1)"),
    (["--keep", "0"], "--keep 0: must be an integer >= 1"),
    (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
    (["--accum", "0"], "--accum 0: must be an integer >= 1"),
    (["--epochs", "0"], "--epochs 0.0: must be a finite number > 0"),
    (["--knn-k", "0"], "--knn-k 0: must be an integer >= 1"),
    (["--workers", "-1"], "--workers -1: must be auto or a whole number >= 0"),
    (["--img-size", "0"], "--img-size 0: must be an integer >= 1"),
    (["--blur-kernel", "4"], "--blur-kernel 4: must be 0 (off) or an odd size >= 3"),
    (["--blur-sigma", "0"], "--blur-sigma 0.0: must be a finite number > 0"),
    (["--loss", "l3"], "--loss l3: must be one of mse, l1"),
    (["--backend", "fast"], "--backend fast: must be one of auto"),
    (["--device", "tpu"], "--device tpu: must be auto, cpu or cuda"),
    (["--steps", "abc"], "--steps: expected int, got 'abc'"),
    (["--hflip", "maybe"], "--hflip: expected true or false, got 'maybe'"),
    (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    (["--std", "0.2,0.2"], "--std 0.2,0.2: the data has 1 channel(s)"),   # digits: one channel
]


@pytest.mark.parametrize("argv,needle", TRAIN_BAD, ids=[" ".join(a) for a, _ in TRAIN_BAD])
def test_train_cli_refuses(argv, needle, capsys, tmp_path):
    argv = ["--out", str(tmp_path / "run")] + argv
    assert_one_line_error(trainer.main, argv, capsys, needle)
    assert not (tmp_path / "run").exists()          # refused before anything was written


def test_train_cli_out_is_a_file(a_file, capsys):
    assert_one_line_error(trainer.main, ["--out", a_file], capsys, f"--out {a_file}: must be a directory, but it is a file")
    assert_one_line_error(trainer.main, ["--out", a_file + "/run"], capsys, f"but {a_file} is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories, so nothing to refuse")
def test_train_cli_out_read_only(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_one_line_error(trainer.main, ["--out", str(ro / "run")], capsys, "is read-only")
    finally:
        ro.chmod(0o755)


def test_out_read_only_is_checked_by_os_access(tmp_path, monkeypatch):
    """The read-only branch itself (root bypasses permissions, so it is driven through os.access)."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match=f"--out {tmp_path}/run: must be a writable directory, but {tmp_path} is read-only"):
        config.check_value("out", str(tmp_path / "run"), config.RULES["out"])


def test_programmatic_config_is_validated_by_the_trainer():
    cfg = config.parse_args([])
    cfg.train.log_every = 0
    with pytest.raises(ValueError, match="--log-every 0: must be an integer >= 1"):
        trainer.Trainer(cfg)
    cfg = config.parse_args([])
    cfg.model.norm_pix = "False"            # a string would be truthy
    with pytest.raises(ValueError, match="--norm-pix 'False'|--norm-pix False: must be true or false"):
        trainer.Trainer(cfg)


# --------------------------------------------------------------------------------------------
# Data sources
# --------------------------------------------------------------------------------------------
def _cifar_dir(tmp_path, payload: bytes):
    root = tmp_path / "cifar"
    root.mkdir()
    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(payload)
    (root / "test_batch").write_bytes(payload)
    return str(root)


GARBAGE = {
    "random bytes": bytes(range(256)) * 4,
    "truncated": pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})[:40],
    "another pickle": pickle.dumps([1, 2, 3]),
    "wrong sizes": pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
    "label count": pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_cifar_pickle(kind, tmp_path, capsys):
    root = _cifar_dir(tmp_path, GARBAGE[kind])
    with pytest.raises(data.DataError, match="data_batch_1 is not a CIFAR python pickle"):
        data.open_source(root, 32)
    assert_one_line_error(trainer.main, ["--preset", "randsac_cifar10_square", "--data", root, "--out",
                                         str(tmp_path / "run")], capsys,
                          "is not a CIFAR python pickle", "re-download")


def test_good_cifar_pickle_still_reads(tmp_path):
    pixels = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    root = _cifar_dir(tmp_path, pickle.dumps({b"data": pixels, b"labels": [3, 7]}))
    src = data.open_source(root, 32)
    assert len(src) == 10 and src.label(1) == 7
    assert torch.equal(src.images[0], torch.from_numpy(pixels[0].reshape(3, 32, 32)).float() / 255)


def test_sixteen_bit_png_is_scaled_by_its_depth(tmp_path):
    from PIL import Image
    (tmp_path / "a").mkdir()
    arr = np.full((6, 5), 32768, dtype=np.uint16)
    arr[0, 0] = 65535
    Image.fromarray(arr).save(tmp_path / "a" / "grey16.png")
    with Image.open(tmp_path / "a" / "grey16.png") as im:
        assert im.mode.startswith("I")            # what Pillow opens a 16-bit PNG as
    img = data.ImageFolderSource(str(tmp_path)).load(0).full()     # decoded in uint8
    assert img.shape == (3, 6, 5) and img.dtype == torch.uint8
    assert (img[:, 1:, 1:] == 128).all(), "16-bit grey read as near-white"   # 32768 / 65535 * 255 = 127.5
    assert img[0, 0, 0] == 255
    eight = np.full((6, 5), 128, dtype=np.uint8)   # 8-bit images unchanged
    Image.fromarray(eight).save(tmp_path / "a" / "grey8.png")
    assert (data.ImageFolderSource(str(tmp_path)).load(1).full() == 128).all()


def test_float_image_is_refused_clearly(tmp_path):
    from PIL import Image
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "a" / "f.tif")
    with pytest.warns(UserWarning, match="f.tif.*mode F.*no agreed value range"):
        assert data.ImageFolderSource(str(tmp_path)).load(0) is None


# --------------------------------------------------------------------------------------------
# Evaluation, interop and figure CLIs
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    """A state-dict file of a tiny RandSAC, the same with NaN weights, and a garbage file."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = models.build("randsac_vit_tiny", img_size=8, patch_size=2, embed_dim=16, depth=1, num_heads=2,
                         decoder_depth=1, decoder_num_heads=2, in_chans=1)
    sd = model.state_dict()
    torch.save(sd, root / "good.pt")
    bad = {k: v.clone() for k, v in sd.items()}
    bad["blocks.0.attn.qkv.weight"].fill_(float("nan"))
    torch.save(bad, root / "nan.pt")
    (root / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 50)
    return {k: str(root / f"{k}.pt") for k in ("good", "nan", "garbage")}


def _ckpt_args(path):
    return ["--ckpt", path, "--model", "randsac_vit_tiny", "--set", "num_heads=2", "--set", "img_size=8",
            "--set", "decoder_num_heads=2", "--device", "cpu"]


EVAL_BAD = [
    (["--epochs", "0"], "--epochs 0.0: must be a finite number > 0"),
    (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
    (["--log-every", "0"], "--log-every 0: must be an integer >= 1"),
    (["--ckpt-every", "0"], "--ckpt-every 0: must be an integer >= 1"),
    (["--eval-every", "-1"], "--eval-every -1: must be an integer >= 1"),
    (["--keep", "0"], "--keep 0: must be an integer >= 1"),
    (["--blr", "-1"], "--blr -1.0: must be a finite number > 0"),
    (["--warmup-epochs", "-1"], "--warmup-epochs -1.0: must be a finite number >= 0"),
    (["--min-lr", "nan"], "--min-lr nan: must be a finite number >= 0"),
    (["--epochs", "x"], "argument --epochs: invalid float value: 'x'"),
]
FINETUNE_BAD = [
    (["--steps", "0"], "--steps 0: must be an integer >= 1"),
    (["--weight-decay", "-1"], "--weight-decay -1.0: must be a finite number >= 0"),
    (["--layer-decay", "0"], "--layer-decay 0.0: must be a number in (0, 1]"),
    (["--drop-path", "1"], "--drop-path 1.0: must be a number in [0, 1)"),
    (["--smoothing", "-0.1"], "--smoothing -0.1: must be a number in [0, 1)"),
    (["--mixup", "-1"], "--mixup -1.0: must be a finite number >= 0"),
    (["--clip-grad", "0"], "--clip-grad 0.0: must be a finite number > 0, or none"),
]


@pytest.mark.parametrize("cli", ["linprobe", "finetune"])
@pytest.mark.parametrize("argv,needle", EVAL_BAD, ids=[" ".join(a) for a, _ in EVAL_BAD])
def test_eval_cli_refuses(cli, argv, needle, tiny_ckpts, tmp_path, capsys):
    main = {"linprobe": linprobe.main, "finetune": finetune.main}[cli]
    out = tmp_path / "out"
    assert_one_line_error(main, _ckpt_args(tiny_ckpts["good"]) + ["--data", "digits", "--out", str(out)] + argv,
                          capsys, needle)
    assert not out.exists()


@pytest.mark.parametrize("argv,needle", FINETUNE_BAD, ids=[" ".join(a) for a, _ in FINETUNE_BAD])
def test_finetune_cli_refuses(argv, needle, tiny_ckpts, tmp_path, capsys):
    assert_one_line_error(finetune.main, _ckpt_args(tiny_ckpts["good"]) + ["--data", "digits", "--out",
                                                                            str(tmp_path / "o")] + argv, capsys, needle)


@pytest.mark.parametrize("cli", ["linprobe", "finetune"])
def test_eval_cli_bad_out_data_and_checkpoints(cli, tiny_ckpts, tmp_path, a_file, capsys):
    main = {"linprobe": linprobe.main, "finetune": finetune.main}[cli]
    base = ["--data", "digits", "--out", str(tmp_path / "o")]
    assert_one_line_error(main, _ckpt_args(tiny_ckpts["good"]) + ["--data", "digits", "--out", a_file], capsys,
                          f"--out {a_file}: must be a directory, but it is a file")
    assert_one_line_error(main, _ckpt_args(tiny_ckpts["nan"]) + base, capsys,
                          "holds non-finite weights", "blocks.0.attn.qkv.weight", "pass an earlier checkpoint")
    assert_one_line_error(main, _ckpt_args(tiny_ckpts["garbage"]) + base, capsys, "cannot be read",
                          "damaged or not a checkpoint")
    garbage = _cifar_dir(tmp_path, GARBAGE["random bytes"])
    assert_one_line_error(main, _ckpt_args(tiny_ckpts["good"]) + ["--data", garbage, "--out", str(tmp_path / "o")],
                          capsys, "is not a CIFAR python pickle")
    assert not (tmp_path / "o").exists()


def test_interop_cli(tiny_ckpts, tmp_path, capsys):
    def export(ckpt, out):
        return ["export"] + _ckpt_args(ckpt)[:-2] + ["--out", out]
    assert_one_line_error(interop.main, export(tiny_ckpts["nan"], str(tmp_path / "x.pt")), capsys,
                          "holds non-finite weights")
    assert_one_line_error(interop.main, export(tiny_ckpts["garbage"], str(tmp_path / "x.pt")), capsys,
                          "cannot be read")
    (tmp_path / "afile").write_text("")     # --out without a weight suffix names a directory
    assert_one_line_error(interop.main, export(tiny_ckpts["good"], str(tmp_path / "afile")), capsys,
                          f"--out {tmp_path / 'afile'}: must be a directory, but it is a file")
    assert_one_line_error(interop.main, export(tiny_ckpts["good"], str(tmp_path / "no" / "x.pt")), capsys,
                          "does not exist — create it first")
    assert_one_line_error(interop.main, ["export", "--ckpt"], capsys, "expected one argument")
    assert not (tmp_path / "x.pt").exists()
    # a 1-channel plain state-dict file records no normalisation: the export asks for it
    assert_one_line_error(interop.main, export(tiny_ckpts["good"], str(tmp_path / "x.pt")), capsys,
                          "pass --mean and --std")
    assert interop.main(export(tiny_ckpts["good"], str(tmp_path / "x.pt")) + ["--mean", "0.5", "--std", "0.25"]) == 0


def test_viz_cli(tiny_ckpts, tmp_path, capsys):
    out = str(tmp_path / "f.png")
    assert_one_line_error(viz.main, ["orders", "--spec", "square:4", "--grid", "4", "--n", "0", "--out", out], capsys,
                          "--n 0: must be an integer >= 1")
    assert_one_line_error(viz.main, ["orders", "--spec", "square:4", "--grid", "0", "--out", out], capsys,
                          "--grid 0: must be comma-separated values, each an integer >= 1")
    assert_one_line_error(viz.main, ["orders", "--spec", "square:4", "--grid", "4", "--out", str(tmp_path)], capsys,
                          "must be a file, but it is a directory")
    recon = ["recon"] + _ckpt_args(tiny_ckpts["good"])[:-2] + ["--images", "digits", "--out", out]
    assert_one_line_error(viz.main, recon + ["--std", "0"], capsys, "--std 0.0: must be comma-separated values, "
                                                                    "each a finite number > 0")
    assert_one_line_error(viz.main, recon + ["--std", "0.2", "0.2"], capsys, "the model takes 1 channel(s)")
    nan = ["recon"] + _ckpt_args(tiny_ckpts["nan"])[:-2] + ["--images", "digits", "--out", out]
    assert_one_line_error(viz.main, nan, capsys, "holds non-finite weights")
    assert not os.path.exists(out)


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------
def _attn_inputs(b=2, h=2, n=8, d=8):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]] * b, dtype=torch.int32)
    return q, k, v, seg


@pytest.mark.parametrize("kw,error,needle", [
    (dict(inclusive="False"), TypeError, "inclusive must be True or False; got 'False' (str)"),
    (dict(inclusive=1), TypeError, "inclusive must be True or False; got 1 (int)"),
    (dict(inclusive=True, scale=float("inf")), ValueError, "scale must be a finite number > 0 or None"),
    (dict(inclusive=True, scale=float("nan")), ValueError, "scale must be a finite number > 0 or None"),
    (dict(inclusive=True, scale=True), ValueError, "got True"),
    (dict(inclusive=True, scale=0.0), ValueError, "got 0.0"),
    (dict(inclusive=True, scale="0.5"), ValueError, "got '0.5'"),
])
def test_segment_attention_arguments(kw, error, needle):
    q, k, v, seg = _attn_inputs()
    with pytest.raises(error) as e:
        ops.segment_attention(q, k, v, seg, seg, backend="sdpa", **kw)
    assert needle in str(e.value)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_segment_attention_non_finite_visible_input(which, bad):
    q, k, v, seg = _attn_inputs()
    tensors = dict(q=q, k=k, v=v)
    tensors[which][1, 0, 3, 2] = bad
    ops.set_checks(True)
    with pytest.raises(ValueError, match=f"{which}.* holds {'NaN' if bad != bad else 'inf'} at index \\(1, 0, 3, 2\\)"):
        ops.segment_attention(*tensors.values(), seg, seg, inclusive=True, backend="sdpa")
    ops.set_checks(False)              # the switch off: no check (no sync), the NaN shows in the output
    out = ops.segment_attention(*tensors.values(), seg, seg, inclusive=True, backend="sdpa")
    assert not torch.isfinite(out[1]).all() and torch.isfinite(out[0]).all()


def test_segment_attention_padding_may_hold_nan_with_checks_on():
    q, k, v, seg = _attn_inputs()
    seg_k = seg.clone()
    seg_k[:, -2:] = 99                      # a sentinel: padding no query sees
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -2:], v2[:, :, -2:] = float("nan"), float("inf")
    ops.set_checks(True)
    torch.testing.assert_close(ops.segment_attention(q, k2, v2, seg, seg_k, inclusive=True, backend="sdpa"),
                               ops.segment_attention(q, k, v, seg, seg_k, inclusive=True, backend="sdpa"),
                               rtol=0, atol=0)


@pytest.mark.parametrize("kw,needle", [
    (dict(patch_size=True), "patch_size must be an integer >= 1; got True"),
    (dict(blur_kernel=3, blur_sigma=float("inf")), "blur_sigma must be a finite number > 0; got inf"),
    (dict(blur_kernel=3, blur_sigma=0.0), "blur_sigma must be a finite number > 0; got 0.0"),
    (dict(blur_kernel=True), "blur_kernel must be an integer >= 0; got True"),
    (dict(norm_pix="yes"), "norm_pix must be True or False; got 'yes'"),
])
@pytest.mark.parametrize("op", ["patch_targets", "patch_loss"])
def test_target_op_arguments(op, kw, needle):
    images = torch.rand(2, 3, 8, 8)
    kw = {"patch_size": 4, **kw}
    patch = kw.pop("patch_size")
    with pytest.raises((TypeError, ValueError)) as e:
        if op == "patch_targets":
            ops.patch_targets(images, patch, **kw)
        else:
            perm = torch.arange(4).expand(2, 4)
            ops.patch_loss(torch.zeros(2, 4, 48), images, patch, perm, **kw)
    assert needle in str(e.value)


def test_norm_pix_over_one_value_is_refused():
    images = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="norm_pix .* needs at least 2 values; a 1x1 patch of 1 channel"):
        ops.patch_targets(images, 1, norm_pix=True)
    assert torch.isfinite(ops.patch_targets(images, 1, norm_pix=False)).all()
    assert torch.isfinite(ops.patch_targets(images, 2, norm_pix=True)).all()   # 4 values: fine


def test_non_finite_images_and_skip_inputs():
    images = torch.rand(2, 3, 8, 8)
    images[1, 2, 5, 6] = float("nan")
    ops.set_checks(True)
    with pytest.raises(ValueError, match=r"images holds NaN at index \(1, 2, 5, 6\); the data holds NaN"):
        ops.patch_targets(images, 4)
    with pytest.raises(ValueError, match="images holds NaN"):
        ops.patch_loss(torch.zeros(2, 4, 48), images, 4, torch.arange(4).expand(2, 4))
    hidden, weight = torch.randn(3, 2, 4, 8), torch.randn(2, 3)
    weight[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"weight holds inf at index \(1, 0\)"):
        ops.skip_memory(hidden, weight)
    ops.set_checks(False)                 # the trainer's steps after the first: no data check, no sync
    assert not torch.isfinite(ops.skip_memory(hidden, weight)).all()
