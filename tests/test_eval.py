"""Evaluation: linear probe (learns, resumes exactly, clear errors), fine-tuning (loss falls, layer-wise
lr decay, mixup / cutmix targets, drop path) and the k-NN monitor, on tiny models and the digits."""
from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch import nn

from randsac_fast import data as data_mod
from randsac_fast import interop, models, train
from randsac_fast.eval import finetune, knn, linprobe

# A tiny RandSAC for the 8x8 single-channel digits, saved as a plain state dict.
TINY = dict(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, decoder_depth=1, in_chans=1)
TINY_ARGS = ["--model", "randsac_vit_tiny", "--set", "num_heads=2", "--set", "img_size=8"]


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """run() joins (or creates) the process group and leaves it to main() to end; end it here."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("enc") / "tiny.pt")
    torch.save(models.build("randsac_vit_tiny", **TINY).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def pretrained_ckpt(tmp_path_factory) -> str:
    """A trainer checkpoint directory after a few pre-training steps (the digits demo, smaller)."""
    out = str(tmp_path_factory.mktemp("pre"))
    argv = ["--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--decoder-depth", "1",
            "--decoder-num-heads", "2", "--steps", "3", "--log-every", "1", "--probe", "false", "--out", out]
    assert train.main(argv) == 0
    return os.path.join(out, "checkpoints", "step_00000003")


def _probe(ckpt, out, *extra, model_args=()):
    return linprobe.run(["--ckpt", ckpt, *model_args, "--data", "digits", "--out", str(out), "--batch-size", "64",
                         "--warmup-epochs", "1", "--augment", "none", *extra])


# --------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------
def test_linprobe_learns_from_a_pretrained_checkpoint(pretrained_ckpt, tmp_path):
    result = _probe(pretrained_ckpt, tmp_path, "--epochs", "4")
    assert result["val_images"] == len(data_mod.digits("test"))
    assert result["top1"] > 0.3, result                       # 10 classes: chance is 0.1
    assert result["top5"] >= result["top1"]
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    evals = [r for r in records if "val_top1" in r]
    assert [r["epoch"] for r in evals] == [1.0, 2.0, 3.0, 4.0] and all("val_top5" in r for r in evals)


def test_linprobe_resume_repeats_the_uninterrupted_run(tiny_ckpt, tmp_path):
    full = _probe(tiny_ckpt, tmp_path, "--epochs", "4", "--keep", "4", "--augment", "mae", model_args=TINY_ARGS)
    ckpts = sorted(os.listdir(tmp_path / "checkpoints"))
    assert len(ckpts) == 4
    for name in ckpts[2:]:                                    # as if stopped after epoch 2
        shutil.rmtree(tmp_path / "checkpoints" / name)
    resumed = _probe(tiny_ckpt, tmp_path, "--epochs", "4", "--keep", "4", "--augment", "mae", "--resume", "latest",
                     model_args=TINY_ARGS)
    assert resumed == full
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    steps = [r["step"] for r in records]
    cut = steps.index(21 * 4) + 1                             # the first run's records end at its last step
    first, again = records[:cut], records[cut:]
    tail = [r for r in first if r["step"] > 21 * 2]
    assert [r["step"] for r in again] == [r["step"] for r in tail] == [50, 63, 84]   # log every 50, eval per epoch
    for a, b in zip(tail, again):
        assert (a["loss"], a["lr"], a.get("val_top1")) == (b["loss"], b["lr"], b.get("val_top1"))


def test_linprobe_missing_val_split_is_one_clear_error(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(data_mod.DataError, match="no val/ split"):
        linprobe.labelled_splits(str(tmp_path / "data"))
    argv = ["--ckpt", tiny_ckpt, *TINY_ARGS, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    assert linprobe.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "val/" in err
    assert not (tmp_path / "run").exists()                    # nothing written before the check


def test_linprobe_rejects_checkpoints_of_the_wrong_kind(tiny_ckpt, tmp_path):
    # An evaluation checkpoint where a pre-trained encoder belongs.
    _probe(tiny_ckpt, tmp_path / "probe", "--epochs", "1", model_args=TINY_ARGS)
    probe_ckpt = str(tmp_path / "probe" / "checkpoints" / "step_00000021")
    with pytest.raises(ValueError, match="linprobe checkpoint, not a pre-trained encoder"):
        _probe(probe_ckpt, tmp_path / "again", "--epochs", "1")
    # A timm export (an encoder without the pre-training model around it).
    encoder, _ = interop.load_model(tiny_ckpt, "randsac_vit_tiny", num_heads=2, img_size=8)
    torch.save(interop.to_timm(encoder), tmp_path / "timm.pt")
    with pytest.raises(ValueError, match="plain ViT encoder"):
        _probe(str(tmp_path / "timm.pt"), tmp_path / "t", model_args=TINY_ARGS)
    # An RGB model for the single-channel digits.
    torch.save(models.build("randsac_vit_tiny", **{**TINY, "in_chans": 3}).state_dict(), tmp_path / "rgb.pt")
    with pytest.raises(ValueError, match="expects 3-channel images"):
        _probe(str(tmp_path / "rgb.pt"), tmp_path / "r", model_args=TINY_ARGS)
    # --cls-token on a model without one.
    with pytest.raises(ValueError, match="has no cls token"):
        _probe(tiny_ckpt, tmp_path / "c", "--cls-token", model_args=TINY_ARGS)


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------
def test_finetune_loss_decreases(tiny_ckpt, tmp_path):
    result = finetune.run(["--ckpt", tiny_ckpt, *TINY_ARGS, "--data", "digits", "--out", str(tmp_path), "--steps", "60",
                           "--batch-size", "64", "--warmup-epochs", "0.2", "--blr", "1e-2", "--augment", "none",
                           "--mixup", "0", "--cutmix", "0", "--eval-every", "100"])
    losses = result["losses"]
    assert len(losses) == 60 and all(np.isfinite(losses))
    # log(10) = 2.303 at the start (the head starts at ~0); it must have come down clearly.
    assert np.mean(losses[:5]) > 2.29 and np.mean(losses[-10:]) < 2.25, losses


def test_finetune_full_recipe_runs_and_checkpoints(tiny_ckpt, tmp_path):
    with pytest.warns(UserWarning, match="RandAugment skipped: it needs timm .*CUDA build of") if not _has_timm() else nullcontext():
        result = finetune.run(["--ckpt", tiny_ckpt, *TINY_ARGS, "--data", "digits", "--out", str(tmp_path),
                               "--steps", "4", "--batch-size", "32", "--log-every", "2"])
    assert len(result["losses"]) == 4 and all(np.isfinite(result["losses"]))
    meta = json.load(open(tmp_path / "checkpoints" / "step_00000004" / "meta.json"))
    assert meta["task"] == "finetune"
    # results.json says what ran: RandAugment only when timm was there to apply it
    applied = "rand-m9-mstd0.5-inc1" if _has_timm() else None
    assert result["randaug_applied"] == applied == json.load(open(tmp_path / "results.json"))["randaug_applied"]


def test_finetune_resume_repeats_the_uninterrupted_run(tiny_ckpt, tmp_path):
    """Drop path (torch RNG) and mixup / cutmix draws (per step) are restored: epoch 2 repeats exactly."""
    argv = ["--ckpt", tiny_ckpt, *TINY_ARGS, "--data", "digits", "--out", str(tmp_path), "--epochs", "2",
            "--batch-size", "64", "--augment", "none", "--log-every", "1", "--keep", "2", "--blr", "1e-2"]
    full = finetune.run(argv)
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000042")  # as if stopped after epoch 1
    resumed = finetune.run(argv + ["--resume", "latest"])
    assert len(full["losses"]) == 42 and resumed["losses"] == full["losses"][21:]
    assert resumed["top1"] == full["top1"]


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
        return True
    except ImportError:
        return False


def test_layer_wise_decay_groups_have_the_right_lrs(tiny_ckpt):
    encoder, _ = interop.load_model(tiny_ckpt, "randsac_vit_tiny", num_heads=2, img_size=8)
    model = finetune.Classifier(encoder, num_classes=10)
    opt = torch.optim.AdamW(finetune.param_groups_lrd(model, weight_decay=0.05, layer_decay=0.5))
    finetune.set_group_lrs(opt, 1.0)
    lr = {name: g["lr"] for g in opt.param_groups for name in g["names"]}
    wd = {name: g["weight_decay"] for g in opt.param_groups for name in g["names"]}
    assert set(lr) == {n for n, _ in model.named_parameters()}            # every parameter, once
    # depth 2: embeddings are layer 0, block i is layer i + 1, the norm and head layer 3.
    assert lr["patch_embed.proj.weight"] == 0.5 ** 3
    assert lr["blocks.0.attn.qkv.weight"] == 0.5 ** 2 and lr["blocks.0.norm1.bias"] == 0.5 ** 2
    assert lr["blocks.1.mlp.fc2.weight"] == 0.5
    assert lr["head.weight"] == lr["norm.weight"] == 1.0
    assert wd["blocks.1.mlp.fc2.weight"] == 0.05 and wd["blocks.1.mlp.fc2.bias"] == 0.0
    assert wd["norm.weight"] == 0.0 and wd["head.weight"] == 0.05


def test_classifier_without_drop_path_matches_the_encoder(tiny_ckpt):
    encoder, _ = interop.load_model(tiny_ckpt, "randsac_vit_tiny", num_heads=2, img_size=8)
    model = finetune.Classifier(encoder, num_classes=10, drop_path_rate=0.5).eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.forward_features(x), encoder.forward_features(x), rtol=0, atol=0)
    assert set(model.state_dict()) >= {k for k in encoder.state_dict() if k.startswith(("blocks.", "patch_embed."))}


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 5)
    y = finetune.drop_path(x, 0.25, training=True)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()   # each sample kept or dropped
    assert abs(float((per_sample[:, 0] == 0).float().mean()) - 0.25) < 0.03
    assert torch.equal(finetune.drop_path(x, 0.25, training=False), x)


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0), (0.0, 0.0)])
def test_mixup_cutmix_targets_sum_to_one_and_match_the_pixels(mixup, cutmix):
    rng = np.random.default_rng(0)
    b, k, smoothing = 8, 10, 0.1
    labels = torch.arange(b) % k
    images = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 16, 16).contiguous()
    for _ in range(10):
        mixed, target = finetune.mix_batch(images, labels, k, mixup, cutmix, 0.5, smoothing, rng)
        torch.testing.assert_close(target.sum(1), torch.ones(b))
        # Image 0 (all 0) mixes with its partner, image 7 (all 7): its own share of the pixels
        # (cutmix: the area outside the box, mixup: the blend weight) is 1 - mean / 7 either way,
        # and must be the λ of its target, whose label entry is λ (1 - smoothing) + smoothing / k.
        lam = (target[0, labels[0]] - smoothing / k) / (1 - smoothing)
        torch.testing.assert_close(lam, 1 - mixed[0].mean() / (b - 1), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# k-NN monitor
# --------------------------------------------------------------------------------------------
class _Features(nn.Module):
    """A stand-in encoder whose features are its input vectors: x [B, D] -> [B, 1, D]."""
    num_prefix_tokens = 0

    def forward_features(self, x):
        return x[:, None, :]


def _clusters(n_per_class, classes, dim, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    x = centers[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return [(x[i:i + 50], labels[i:i + 50]) for i in range(0, len(labels), 50)]


def test_knn_separable_features_are_classified_perfectly():
    train_loader, val_loader = _clusters(40, 5, 16, 0.1, 0), _clusters(20, 5, 16, 0.1, 1)
    assert knn.knn_accuracy(_Features(), train_loader, val_loader, k=20, T=0.07) == 1.0


def test_knn_of_unrelated_labels_is_near_chance():
    train_loader = _clusters(40, 5, 16, 0.1, 0)
    g = torch.Generator().manual_seed(5)
    val_loader = [(x, torch.randint(0, 5, y.shape, generator=g)) for x, y in _clusters(40, 5, 16, 0.1, 1)]
    assert knn.knn_accuracy(_Features(), train_loader, val_loader) < 0.4


def test_knn_vote_is_weighted_by_similarity():
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 1, 1])
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 0.3]]), dim=1)
    scores = knn.knn_classify(bank, labels, query, k=3, T=0.1, num_classes=2)
    sim = query @ bank.T
    expected = torch.stack([(sim[0, 0] / 0.1).exp(), 2 * (sim[0, 1] / 0.1).exp()])
    torch.testing.assert_close(scores[0], expected)
    assert scores.argmax() == 0          # one close neighbour beats two far ones


def test_knn_on_a_sharded_encoder_with_the_labelled_loaders():
    """The monitor as the trainer calls it: an FSDP2-wrapped model and per-rank loaders."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    from randsac_fast.runtime.parallel import init_distributed, parallelize
    torch.manual_seed(0)
    model = parallelize(models.build("randsac_vit_tiny", **TINY), init_distributed("cpu"))
    register_fsdp_forward_method(model, "forward_features")
    source = data_mod.digits("train")
    train_loader, val_loader = knn.labelled_loaders("digits", 8, source.mean, source.std, 128, limit=600)
    assert sum(len(y) for _, y, _ in val_loader) == 450        # the whole test split (450 < the cap), none dropped
    acc = knn.knn_accuracy(model, train_loader, val_loader, k=20)
    assert 0.3 < acc <= 1.0                                     # random features of digits beat chance


def test_linprobe_with_two_gloo_ranks(tiny_ckpt, tmp_path):
    """torchrun, 2 processes: DDP head, sharded data, accuracy summed over ranks, per-rank checkpoint state."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "randsac_fast.linprobe", "--ckpt", tiny_ckpt, *TINY_ARGS, "--data", "digits", "--out", str(tmp_path),
           "--epochs", "3", "--warmup-epochs", "1", "--batch-size", "32", "--augment", "none"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.load(open(tmp_path / "results.json"))
    assert result["val_images"] == 450 and result["top1"] > 0.3
    assert proc.stdout.count("== linear probe done ==") == 1             # rank 0 reports
    last = sorted(os.listdir(tmp_path / "checkpoints"))[-1]
    assert {"rank_0.pt", "rank_1.pt"} <= set(os.listdir(tmp_path / "checkpoints" / last))
