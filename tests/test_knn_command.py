"""k-NN scores every image: shards cover each image exactly once whatever the world size, the
command reports how many it scored, and two gloo ranks with uneven shards score them all."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from randsac_fast import models
from randsac_fast.eval import knn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, decoder_depth=1, in_chans=3)
TINY_ARGS = ["--model", "randsac_vit_tiny", "--set", "num_heads=2,img_size=8"]


@pytest.fixture(autouse=True)
def _no_process_group_left():
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _folder(root, train_per_class: int, val_per_class: int, classes=("a", "b", "c", "d")) -> str:
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            os.makedirs(root / split / name)
            for i in range(n):
                pixels = np.full((8, 8, 3), 40 + 50 * c, dtype=np.uint8) + rng.integers(0, 20, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("enc") / "tiny.pt")
    torch.save(models.build("randsac_vit_tiny", **TINY).state_dict(), path)
    return path


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_shards_cover_every_image_once_in_equal_batch_counts(tmp_path, world):
    data = _folder(tmp_path, 3, 10)         # train 12, val 40 images
    seen, batch_counts = [], set()
    for rank in range(world):
        _, val = knn.labelled_loaders(data, 8, (0.5,) * 3, (0.25,) * 3, 16, rank, world)
        batch_counts.add(len(val.batch_sampler))
        seen += [i for batch in val.batch_sampler for i, real in batch if real]
    assert sorted(seen) == list(range(40)) and len(batch_counts) == 1


def test_knn_command_scores_all_40_images(tiny_ckpt, tmp_path):
    data = _folder(tmp_path / "data", 3, 10)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = knn.main(["--ckpt", tiny_ckpt, *TINY_ARGS, "--data", data, "--batch-size", "16", "--k", "5",
                         "--out", str(tmp_path / "knn")])
    assert code == 0
    result = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert (result["val_images"], result["train_images"]) == (40, 12)
    assert "(40 validation images scored against 12 training images, k=5)" in out.getvalue()
    assert result["top1"] * 40 == round(result["top1"] * 40)        # a count of hits out of 40


def test_knn_help_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "randsac_fast.eval.knn", "--help"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert proc.returncode == 0 and "--k K" in proc.stdout and "(default: 20)" in proc.stdout


def test_knn_with_two_gloo_ranks_and_uneven_shards(tiny_ckpt, tmp_path):
    data = _folder(tmp_path / "data", 3, 10)
    os.remove(os.path.join(data, "val", "d", "9.png"))                 # 39 images: shards of 20 and 19
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "randsac_fast.eval.knn", "--ckpt", tiny_ckpt, *TINY_ARGS, "--data", data, "--batch-size", "8",
           "--k", "5", "--out", str(tmp_path / "knn")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert (result["val_images"], result["train_images"]) == (39, 12)
    assert proc.stdout.count("== k-NN done ==") == 1
    # The same score as one process: the shards and the gathered bank lose and repeat nothing.
    one = io.StringIO()
    with contextlib.redirect_stdout(one):
        assert knn.main(["--ckpt", tiny_ckpt, *TINY_ARGS, "--data", data, "--k", "5", "--out", str(tmp_path / "one")]) == 0
    assert json.loads((tmp_path / "one" / "results.json").read_text())["top1"] == pytest.approx(result["top1"])


def test_knn_monitor_takes_an_evaluation_root_and_names_knn_data_otherwise(tmp_path):
    from randsac_fast import train
    data = _folder(tmp_path / "data", 3, 10)
    tiny = ["--img-size", "8", "--patch-size", "2", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
            "--decoder-depth", "1", "--decoder-num-heads", "2", "--batch-size", "4", "--workers", "0", "--no-probe"]
    out = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert train.main(["--data", data, *tiny, "--steps", "1", "--knn-every", "1", "--out", str(out)]) == 0
    record = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "knn_top1" in l][-1]
    assert record["knn_images"] == 40
    assert json.loads((out / "config.json").read_text())["data"]["knn_data"] == data   # reproducible as recorded
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert train.main(["--data", "synthetic", *tiny, "--steps", "1", "--knn-every", "1",
                           "--out", str(tmp_path / "bad")]) == 1
    line = [l for l in err.getvalue().splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "--knn-data" in line[0] and "--knn-every 1" in line[0]


def test_saim_probes_next_fine_tune_keeps_the_cls_token(tmp_path, capsys):
    from randsac_fast.eval import linprobe
    result = {"top1": 0.5, "top5": 1.0, "val_images": 40, "results_file": str(tmp_path / "results.json"),
              "checkpoint": None}
    linprobe.summarise("randsac_fast.eval.linprobe", ["--ckpt", "ckpt", "--data", "digits", "--cls-token",
                                                      "--out", str(tmp_path / "lin")], result)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("fine-tune"))
    assert "--cls-token" in line.split()
