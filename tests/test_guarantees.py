"""The guarantees a user can count on, one class at a time, through the commands' ``main(argv)`` (or a
subprocess where the process itself is the subject): nothing a user or another command wrote is
overwritten, nothing nonsensical is accepted, and every refusal is one line that names the value and
the fix, with exit code 1 (130 when interrupted) and no traceback. Each refusal is also checked to
leave every file that existed before byte-identical."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from randsac_fast import info, interop, models, orders, ops, train, viz
from randsac_fast.data import __main__ as data_cli
from randsac_fast.eval import finetune, linprobe
from randsac_fast import outputs
from randsac_fast.runtime.lock import RunLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--embed-dim", "16", "--depth", "2", "--num-heads", "2", "--decoder-depth", "1", "--decoder-num-heads", "2",
        "--batch-size", "16", "--probe", "false", "--log-every", "1"]


@pytest.fixture(autouse=True)
def _no_process_group_left():
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def snapshot(*roots) -> dict:
    """{path: sha256} of every file under ``roots`` (files or directories)."""
    found = {}
    for root in roots:
        root = str(root)
        paths = [root] if os.path.isfile(root) else [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        for p in paths:
            with open(p, "rb") as fh:
                found[p] = hashlib.sha256(fh.read()).hexdigest()
    return found


def refused(capsys, main, argv, *needles, code: int = 1, roots=()) -> str:
    """Run ``main(argv)``; assert the exit code, ONE stderr line holding every needle, no traceback,
    and every file under ``roots`` byte-identical afterwards. Returns the line."""
    before = snapshot(*roots)
    capsys.readouterr()
    got = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert got == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert snapshot(*roots) == before, "a refused command changed files that existed before"
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A pre-training run directory with one checkpoint, and a timm export directory of it."""
    base = tmp_path_factory.mktemp("g")
    out = str(base / "run")
    assert train.main([*TINY, "--steps", "1", "--out", out]) == 0
    ckpt = os.path.join(out, "checkpoints", "step_00000001")
    export = str(base / "timm")
    assert interop.main(["export", "--ckpt", ckpt, "--out", export]) == 0
    return out, ckpt, export


# ---- 1. ownership: nothing another command wrote is overwritten --------------------------------------
def test_export_refuses_run_and_checkpoint_directories_and_taken_sidecars(run, capsys):
    out, ckpt, _ = run
    refused(capsys, interop.main, ["export", "--ckpt", ckpt, "--out", out], out, "pre-training run directory",
            "--force", "another --out", roots=[out])
    refused(capsys, interop.main, ["export", "--ckpt", ckpt, "--out", ckpt], "checkpoint directory", "--force",
            roots=[out])
    # config.pt's sidecar would be the run's config.json; meta.pt's a checkpoint's meta.json
    refused(capsys, interop.main, ["export", "--ckpt", ckpt, "--out", os.path.join(out, "config.pt")],
            os.path.join(out, "config.json"), "--force", roots=[out])
    refused(capsys, interop.main, ["export", "--ckpt", ckpt, "--out", os.path.join(ckpt, "meta.pt")],
            "checkpoint directory", "another --out", roots=[out])
    refused(capsys, interop.main, ["pretrained", "--ckpt", ckpt, "--out", out], out, "--force", roots=[out])


def test_export_beside_a_run_is_allowed_and_may_replace_only_its_own_files(run, tmp_path, capsys):
    out, ckpt, _ = run
    target = str(tmp_path / "vit.pt")
    assert interop.main(["export", "--ckpt", ckpt, "--out", target]) == 0
    assert interop.main(["export", "--ckpt", ckpt, "--out", target]) == 0          # its own: replaced
    user = tmp_path / "mine.pt"
    user.write_bytes(b"the user's own file")
    refused(capsys, interop.main, ["export", "--ckpt", ckpt, "--out", str(user)], str(user), "--force",
            roots=[tmp_path])
    assert interop.main(["export", "--ckpt", ckpt, "--out", str(user), "--force"]) == 0
    assert user.read_bytes() != b"the user's own file"
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]                  # no temporary debris


def test_train_refuses_an_export_directory_and_a_users_config(run, tmp_path, capsys):
    _, _, export = run
    refused(capsys, train.main, [*TINY, "--steps", "1", "--out", export], export, "timm export directory",
            "--force", roots=[export])
    assert not os.path.exists(os.path.join(export, ".lock"))                     # not even a lock file
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "notes"}')
    refused(capsys, train.main, [*TINY, "--steps", "1", "--out", str(mine)], "config.json", "--force",
            roots=[mine])


def test_evaluation_commands_refuse_a_pretraining_run_directory(run, capsys):
    out, ckpt, _ = run
    # a probe's checkpoints in a pre-training run would become that run's "--resume latest"
    refused(capsys, linprobe.main, ["--ckpt", ckpt, "--data", "digits", "--out", out, "--epochs", "1"],
            out, "pre-training run directory", "--force", roots=[out])
    refused(capsys, finetune.main, ["--ckpt", ckpt, "--data", "digits", "--out", out, "--steps", "1"],
            out, "--force", roots=[out])


def test_a_second_linprobe_on_one_out_is_refused(run, tmp_path, capsys):
    _, ckpt, _ = run
    probe = tmp_path / "probe"
    held = RunLock(str(probe)).acquire()                                          # the first probe run
    try:
        refused(capsys, linprobe.main, ["--ckpt", ckpt, "--data", "digits", "--out", str(probe), "--epochs", "1"],
                "in use by another run", "another --out", roots=[probe])
    finally:
        held.release()


def test_viz_info_ablate_and_data_refuse_files_they_did_not_write(run, tmp_path, capsys, monkeypatch):
    out, _, export = run
    refused(capsys, viz.main, ["orders", "--spec", "random", "--grid", "4", "--out", os.path.join(out, "metrics.jsonl")],
            "metrics.jsonl", "--force", roots=[out])
    png = tmp_path / "figure.png"
    png.write_bytes(b"not written by viz")
    refused(capsys, viz.main, ["orders", "--spec", "random", "--grid", "4", "--out", str(png)], str(png), "--force",
            roots=[tmp_path])
    monkeypatch.setattr(info, "collect", lambda quick, out=None: pytest.fail("ran the checks before checking --out"))
    refused(capsys, info.main, ["--out", os.path.join(out, "config.json")], "config.json", "--force", roots=[out])
    from randsac_fast import ablate
    refused(capsys, ablate.main, ["--specs", "raster", "--seeds", "0", "--out", out, "--steps", "1"],
            out, "--force", roots=[out])
    refused(capsys, data_cli.main, ["make-shards", str(tmp_path), export], export, "--force", roots=[export])


def test_a_run_directory_without_manifest_still_resumes_and_names_what_it_skips(run, tmp_path, capsys):
    """Run directories written before manifests existed are recognised by their files; --resume
    latest names every checkpoint it passes over (here one without meta.json)."""
    out = str(tmp_path / "old")
    shutil.copytree(run[0], out)
    os.remove(os.path.join(out, outputs.MANIFEST))
    assert outputs.identify(out) == "train"
    partial = os.path.join(out, "checkpoints", "step_00000009")
    shutil.copytree(os.path.join(out, "checkpoints", "step_00000001"), partial)
    os.remove(os.path.join(partial, "meta.json"))
    capsys.readouterr()
    assert train.main([*TINY, "--steps", "2", "--out", out, "--resume", "latest", "--allow-changed"]) == 0
    err = capsys.readouterr().err
    assert f"skips {partial}: it has no meta.json" in err, err
    assert "resumed from" in err and os.path.isdir(os.path.join(out, "checkpoints", "step_00000002"))
    assert os.path.isdir(partial)                                                 # kept, not read


def test_identify_recognises_directories_written_before_manifests(run, tmp_path):
    out, ckpt, export = run
    assert outputs.identify(ckpt) == "checkpoint"
    assert outputs.identify(os.path.dirname(ckpt)) == "checkpoints"
    legacy = tmp_path / "exp"
    shutil.copytree(export, legacy)
    os.remove(legacy / outputs.MANIFEST)
    assert outputs.identify(str(legacy)) == "interop export"
    assert outputs.identify(str(tmp_path / "nothing")) is None


# ---- 2. nothing nonsensical is accepted ------------------------------------------------------------
def test_architecture_overrides_of_a_checkpoint_are_refused_naming_what_can_change(run, capsys):
    out, ckpt, _ = run
    refused(capsys, linprobe.main, ["--ckpt", ckpt, "--data", "digits", "--out", out + "_probe", "--set", "depth=1"],
            "--set depth=1", "depth=2", "img_size", "drop --set depth")
    with pytest.raises(ValueError, match="num_heads=1.*fields that can change"):
        interop.load_model(ckpt, num_heads=1)                   # same shapes, another function: refused too
    model, _ = interop.load_model(ckpt, img_size=16)            # RandSAC's fixed position embeddings: mapped
    assert model.img_size == (16, 16)


def test_export_refuses_a_zero_std(run, tmp_path, capsys):
    _, ckpt, _ = run
    refused(capsys, interop.main, ["export", "--ckpt", ckpt, "--out", str(tmp_path / "x.pt"), "--mean", "0",
                                   "--std", "0"], "--std", "> 0")
    assert not os.path.exists(tmp_path / "x.pt")


@pytest.mark.parametrize("kwargs, needle", [
    (dict(img_size=0), "img_size must be an integer >= 1"),
    (dict(depth=0), "depth must be an integer >= 1"),
    (dict(backend="foo"), "backend must be one of auto"),
    (dict(num_heads=5), "use num_heads 4 or 6"),
    (dict(decoder_depth=0), "decoder_depth must be an integer >= 1"),
])
def test_models_build_names_the_bad_argument(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        models.build("randsac_vit_tiny", **kwargs)


def test_segment_order_checks_its_values_when_checks_are_on():
    good = dict(perm=torch.tensor([[0, 1, 2, 3]]), seg=torch.tensor([[0, 0, 1, 1]], dtype=torch.int32))
    with pytest.raises(ValueError, match="permutations of 0..3"):
        orders.SegmentOrder(torch.tensor([[0, 0, 1, 2]]), good["seg"])
    with pytest.raises(ValueError, match="segment_size 1 says"):
        orders.SegmentOrder(**good, segment_size=1)
    assert orders.SegmentOrder(**good, segment_size=2).segment_size == 2
    with pytest.raises(ValueError, match="positive divisor of the 4 tokens"):
        orders.SegmentOrder(**good, segment_size=3)
    ops.set_checks(False)      # the hot path: no device sync, only the free checks
    assert orders.SegmentOrder(torch.tensor([[0, 0, 1, 2]]), good["seg"]).batch == 1
    with pytest.raises(TypeError, match="SegmentOrder perm must be a torch.Tensor"):
        orders.SegmentOrder([[0, 1]], good["seg"])


def test_api_misuse_names_the_argument():
    model = models.build("randsac_vit_tiny", img_size=8, patch_size=2, embed_dim=32, depth=1, num_heads=2,
                         decoder_depth=1, in_chans=1)
    images = torch.randn(2, 1, 8, 8)
    order = orders.sample("random", 2, model.grid)
    cases = [
        (lambda: model(images, "random"), TypeError, "order must be a randsac_fast.orders.SegmentOrder"),
        (lambda: model(images.to(torch.uint8), order), TypeError, "images must be a floating-point tensor"),
        (lambda: model(images, orders.sample("random", 3, model.grid)), ValueError, "draw the order with batch=2"),
        (lambda: orders.sample("random", 2, 4, generator=0), TypeError, "generator must be a torch.Generator"),
        (lambda: orders.sample("random", 2, 4, device="gpu7"), ValueError, "device must be a torch device"),
        (lambda: ops.segment_attention(*(torch.randn(1, 2, 4, 0),) * 3, order.seg[:1], order.seg[:1],
                                       inclusive=True), ValueError, "head dim D = 0"),
        (lambda: ops.patch_targets(torch.empty(2, 3, 8, 8, device="meta"), 4), ValueError, "images is on the meta"),
    ]
    for call, kind, needle in cases:
        with pytest.raises(kind, match=needle):
            call()


# ---- 3. no traceback from a command, ever ---------------------------------------------------------
def test_bad_flags_are_one_line(tmp_path, capsys):
    refused(capsys, finetune.main, ["--ckpt", "x", "--data", "digits", "--out", str(tmp_path / "f"),
                                    "--randaug", "rand-x9"], "--randaug 'rand-x9'", "rand-m9-mstd0.5-inc1")
    refused(capsys, train.main, [*TINY, "--seed", str(2**70), "--out", str(tmp_path / "t")], str(2**70), "2**63 - 1")
    refused(capsys, __import__("randsac_fast.ablate", fromlist=["main"]).main,
            ["--specs", "raster,foo", "--out", str(tmp_path / "a")], "unknown order spec 'foo'", "Valid forms")
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "t")


def test_outputs_into_a_file_or_a_read_only_directory_are_one_line(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(info, "collect", lambda quick, out=None: pytest.fail("ran the checks before checking --out"))
    refused(capsys, info.main, ["--out", str(blocker / "info.json")], str(blocker), "is a file", roots=[tmp_path])
    from randsac_fast import ablate
    refused(capsys, ablate.main, ["--specs", "raster", "--out", str(blocker)], str(blocker), "pass a directory",
            roots=[tmp_path])

    def read_only(path, write):
        raise OSError(errno.EROFS, "Read-only file system", path)
    monkeypatch.setattr(info, "collect", lambda quick, out=None: {"selfcheck": []})
    monkeypatch.setattr(info, "report", lambda i: "report")
    monkeypatch.setattr(outputs, "_replace", read_only)
    refused(capsys, info.main, ["--out", str(tmp_path / "ro" / "info.json")], "read-only file system",
            "writable", roots=[tmp_path])


def test_a_full_disk_while_logging_metrics_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    from randsac_fast.runtime import metrics

    class FullDisk:
        name = str(tmp_path / "run" / "metrics.jsonl")

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    real_init = metrics.MetricsLogger.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        if self.file is not None:
            self.file.close()
            self.file = FullDisk()
    monkeypatch.setattr(metrics.MetricsLogger, "__init__", init)
    line = refused(capsys, train.main, [*TINY, "--steps", "1", "--out", str(tmp_path / "run")],
                   f"no space left on {tmp_path / 'run' / 'metrics.jsonl'}", "free", "free space there")
    assert "inline_container" not in line


def test_disk_errors_become_one_line_with_the_free_space(tmp_path):
    e = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    text = outputs.disk_message(e)
    assert text.startswith(f"no space left on {tmp_path / 'x'} (") and "free)" in text
    assert "a part of this path is a file" in outputs.disk_message(OSError(errno.ENOTDIR, "Not a directory", "a/b"))


def test_atomic_write_leaves_the_old_file_whole_when_the_write_fails(tmp_path):
    path = tmp_path / "results.json"
    outputs.atomic_text(str(path), "old")

    def half(tmp):
        with open(tmp, "w") as fh:
            fh.write("ne")
        raise OSError(errno.ENOSPC, "No space left on device", tmp)
    with pytest.raises(outputs.OutputError, match="no space left on"):
        outputs.atomic_write(str(path), half)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]   # no temporary left


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(tmp_path):
    """SIGINT while the command is still importing torch (or, on a fast machine, just after)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "randsac_fast.train", "--steps", "1", "--out", str(tmp_path / "r")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted"), err
    assert not os.path.exists(tmp_path / "r" / "checkpoints")


def test_launcher_ends_a_failed_torchrun_with_the_workers_error_line(tmp_path):
    """torchrun's agent prints its own traceback and a failure table; the launcher prints the
    worker's one line last and exits with the worker's code."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "randsac_fast.launch", "--nproc_per_node", "2", "--standalone",
                          "-m", "randsac_fast.train", "--batch-size", "3", "--steps", "1", "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1, res.stderr
    assert last.startswith("error: global batch 3 (--batch-size) is not divisible by the 2 processes"), res.stderr
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr, res.stderr
