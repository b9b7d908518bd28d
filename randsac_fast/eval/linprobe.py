"""Linear probe of a frozen encoder: ``torchrun -m randsac_fast.linprobe --ckpt CKPT --data DATA``.

The papers' linear evaluation. The encoder runs unmasked and frozen; one vector per image is the
average of its last-block (normed) patch tokens (RandSAC's protocol) or, with ``--cls-token``,
SAIM's cls token. On top sits MAE's probe head: BatchNorm1d without affine parameters (it only
standardises the features, which makes one learning rate fit every encoder) and a linear layer.

Recipe (MAE's linear probe, with one documented change): base lr 0.1, lr = blr * global batch / 256,
linear warmup then cosine decay, weight decay 0, 90 epochs, RandomResizedCrop(0.08, 1) + flip.
MAE uses LARS; here the optimizer is SGD with momentum 0.9 — on a single linear layer behind a
BatchNorm, LARS's per-layer trust ratio only rescales one learning rate.

Distribution: the frozen encoder is replicated on every rank (no gradients, so nothing to shard);
the head is wrapped in DDP (gloo on CPU, NCCL on GPU, via :mod:`randsac_fast.runtime.parallel`). Each rank
reads its own shard of the training set; top-1 / top-5 on the validation split are summed over
ranks. Progress and ``metrics.jsonl`` go through :mod:`randsac_fast.runtime.metrics`; the head and its
optimizer are checkpointed with :mod:`randsac_fast.runtime.checkpoint` (DCP), so ``--resume latest`` goes on.

Labelled data: ``--data digits`` (the fixed 75/25 train/test split of scikit-learn's digits), a
directory with ``train/`` and ``val/`` ImageFolder trees, or CIFAR-10/100 python pickles (train and
test files).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import config as config_mod
from .. import data as data_mod
from .. import interop, ops
from ..runtime import collectives
from ..runtime.checkpoint import Checkpointer, read_meta, rng_state, set_rng_state
from ..runtime.lock import lock_run_dir, release_all, releasing_locks
from ..runtime.metrics import MetricsLogger, require_wandb
from ..runtime.parallel import Dist, init_distributed
from ..runtime.schedule import fit_warmup, lr_at, scaled_lr, set_lr
from ..runtime.threads import set_threads
from ..runtime.summary import command, eval_summary, run_command, write_results

__all__ = ["labelled_splits", "load_encoder", "eval_transform", "evaluate", "ProbeHead", "Probe", "LINEAR", "run",
           "main"]


# --------------------------------------------------------------------------------------------
# Labelled splits
# --------------------------------------------------------------------------------------------
def _cifar_test(root: str) -> data_mod.TensorSource:
    """The test file of CIFAR-10 (``test_batch``) or CIFAR-100 (``test``) python pickles."""
    ten = os.path.exists(os.path.join(root, "data_batch_1"))
    name, key = ("test_batch", b"labels") if ten else ("test", b"fine_labels")
    path = os.path.join(root, name)
    if not os.path.exists(path):
        raise data_mod.DataError(f"CIFAR test file {path} is missing; evaluation needs the test split of "
                                 "the python-pickle layout (cifar-10-batches-py or cifar-100-python)")
    pixels, labels = data_mod.read_cifar_pickle(path, key)
    images = torch.from_numpy(pixels).float() / 255
    return data_mod.TensorSource(f"cifar{'10' if ten else '100'}-test", images, torch.tensor(labels),
                                 data_mod.CIFAR_MEAN, data_mod.CIFAR_STD)


def labelled_splits(data: str):
    """(train source, validation source) for ``--data``; a missing label split is a DataError."""
    if data == "digits":
        return data_mod.digits("train"), data_mod.digits("test")
    if data == "synthetic" or not os.path.isdir(data):
        raise data_mod.DataError(f"--data {data!r}: evaluation needs labelled train and validation splits; "
                                 "pass digits, a directory with train/ and val/ ImageFolder trees, or CIFAR "
                                 "python pickles")
    names = set(os.listdir(data))
    if "data_batch_1" in names or {"train", "meta"} <= names:
        return data_mod.cifar(data), _cifar_test(data)
    missing = [s for s in ("train", "val") if not os.path.isdir(os.path.join(data, s))]
    if missing:
        raise data_mod.DataError(f"data directory {data!r} has no {' or '.join(s + '/' for s in missing)} split; "
                                 f"evaluation expects {data}/train/<class>/<image> and {data}/val/<class>/<image>")
    classes = [sorted(d for d in os.listdir(os.path.join(data, s)) if os.path.isdir(os.path.join(data, s, d)))
               for s in ("train", "val")]
    if classes[0] != classes[1]:   # ImageFolderSource numbers the class folders in sorted order
        only = sorted(set(classes[0]) ^ set(classes[1]))
        raise data_mod.DataError(f"train/ and val/ of {data!r} have different class folders (in one only: "
                                 f"{', '.join(only[:5])}); labels would not match — give both splits the same "
                                 "<class> folders")
    return tuple(data_mod.ImageFolderSource(os.path.join(data, s)) for s in ("train", "val"))


def eval_transform(img_size: int, mean, std) -> data_mod.Augment:
    """Deterministic evaluation view: the centred largest square, resized, normalised (a crop of
    scale 1 and ratio 1 has only that one box)."""
    return data_mod.Augment(img_size, (1.0, 1.0), (1.0, 1.0), False, tuple(mean), tuple(std))


# --------------------------------------------------------------------------------------------
# The frozen encoder
# --------------------------------------------------------------------------------------------
def load_encoder(ckpt: str, model: str | None = None, sets: dict | None = None, backend: str = "auto"):
    """A pre-trained RandSAC / SAIM model from ``ckpt`` -> (model, meta); evaluation checkpoints
    (a linear probe's or a fine-tune's) are rejected with the fix."""
    meta_file = os.path.join(ckpt, "meta.json")
    if os.path.isdir(ckpt) and os.path.exists(meta_file):
        with open(meta_file) as fh:
            task = json.load(fh).get("task")
        if task is not None:
            raise ValueError(f"--ckpt {ckpt} is a {task} checkpoint, not a pre-trained encoder; pass the "
                             "pre-training checkpoint (.../checkpoints/step_XXXXXXXX of a randsac_fast.train run) "
                             f"or use --resume to continue this {task} run")
    return interop.load_model(ckpt, model, backend=backend, **(sets or {}))


def norm_stats(meta: dict, source) -> tuple[tuple, tuple]:
    """The pre-training normalisation when the checkpoint recorded one, else the data set's."""
    d = meta.get("config", {}).get("data", {})
    return tuple(d.get("mean") or source.mean), tuple(d.get("std") or source.std)


def check_channels(model, source, ckpt: str) -> None:
    if source.channels != model.in_chans:
        raise ValueError(f"--ckpt {ckpt} expects {model.in_chans}-channel images but --data {source.name} has "
                         f"{source.channels}; probe on data of the kind it was pre-trained on")


def pooled(model: nn.Module, images: Tensor, cls_token: bool = False) -> Tensor:
    """images [B, C, H, W] -> [B, D] fp32: mean of the patch tokens, or the cls token."""
    x = model.forward_features(images)
    return (x[:, 0] if cls_token else x[:, model.num_prefix_tokens:].mean(dim=1)).float()


# --------------------------------------------------------------------------------------------
# Evaluation (shared with fine-tuning)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(logits_fn, source, transform, batch_size: int, dist_info: Dist) -> dict:
    """top-1 / top-5 accuracy (fractions) of ``logits_fn(images [B, C, S, S]) -> [B, K]`` on source.

    Rank r takes samples r, r + world, ...; the shards are padded to one length (padding and
    unreadable images are masked out) so every rank runs the same number of forwards, which a
    sharded model needs. Collective.
    """
    world, rank, device = dist_info.world, dist_info.rank, dist_info.device
    per_rank = math.ceil(len(source) / world)
    index = [rank + world * i for i in range(per_rank)]
    hits = torch.zeros(3, dtype=torch.float64, device=device)   # top-1 hits, top-5 hits, count
    g = torch.Generator()
    for start in range(0, per_rank, batch_size):
        imgs, labels, valid = [], [], []
        for i in index[start:start + batch_size]:
            img = source.load(i) if i < len(source) else None
            valid.append(img is not None)
            img = img if img is not None else torch.zeros(source.channels, transform.img_size, transform.img_size)
            imgs.append(transform(img, g))
            labels.append(source.label(i) if i < len(source) else 0)
        logits = logits_fn(torch.stack(imgs).to(device)).float()
        labels = torch.tensor(labels, device=device)
        valid = torch.tensor(valid, device=device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct = (top == labels[:, None]) & valid[:, None]
        hits += torch.stack([correct[:, 0].sum(), correct.any(1).sum(), valid.sum()]).double()
    hits = collectives.all_reduce(hits)
    return {"top1": float(hits[0] / hits[2]), "top5": float(hits[1] / hits[2]), "val_images": int(hits[2])}


# --------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------
class ProbeHead(nn.Sequential):
    """[B, D] -> [B, K]: BatchNorm1d without affine (standardises features), then a linear layer."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)   # MAE's probe init
        nn.init.zeros_(self[1].bias)


def build_parser() -> argparse.ArgumentParser:
    p = config_mod.Parser(prog="python -m randsac_fast.linprobe",
                                description="Linear probe of a frozen RandSAC / SAIM encoder (torchrun for "
                                            "several processes).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    interop.add_checkpoint_args(p)
    p.add_argument("--data", required=True, help="digits, a directory with train/ and val/, or CIFAR pickles")
    p.add_argument("--out", default="runs/linprobe", help="run directory: metrics.jsonl, checkpoints")
    p.add_argument("--epochs", type=float, default=90, help="training epochs (MAE: 90)")
    p.add_argument("--warmup-epochs", type=float, default=10, help="linear warmup epochs (MAE: 10)")
    p.add_argument("--batch-size", type=int, default=256, help="images per rank per step")
    p.add_argument("--blr", type=float, default=0.1, help="base lr; lr = blr * global batch / 256")
    p.add_argument("--min-lr", type=float, default=0.0, help="final lr of the cosine decay")
    p.add_argument("--cls-token", action=argparse.BooleanOptionalAction, default=False,
                   help="probe the cls token (SAIM) instead of avg-pooling")
    p.add_argument("--augment", choices=("mae", "none"), default="mae",
                   help="mae: RandomResizedCrop(0.08, 1) + horizontal flip; none: the evaluation view")
    add_run_args(p, log_every=50)
    return p


def add_run_args(p, log_every: int) -> None:
    """Flags every evaluation command shares: resume, checkpoint/eval/log cadence, seed, device."""
    p.add_argument("--resume", default=None, help="'latest' (newest checkpoint in --out) or a checkpoint directory")
    p.add_argument("--force", action="store_true",
                   help="write into an --out that holds another command's files (they are kept unless replaced)")
    p.add_argument("--ckpt-every", type=int, default=1, help="checkpoint every K epochs (and at the end)")
    p.add_argument("--keep", type=int, default=2, help="keep the last K checkpoints")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every K epochs (and at the end)")
    p.add_argument("--log-every", type=int, default=log_every, help="log metrics every K steps (and at each evaluation)")
    p.add_argument("--seed", type=int, default=0, help="random seed (init, data order, augmentation)")
    p.add_argument("--workers", type=int, default=0, help="dataloader worker processes per rank")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op CPU threads per process (None: OMP_NUM_THREADS, else the cores available / local ranks)")
    p.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=False,
                   help="also log to Weights & Biases (pip install wandb; WANDB_MODE=offline works offline)")
    p.add_argument("--wandb-project", default="randsac_fast", help="Weights & Biases project of --wandb")


def _say(dist_info):
    """Print a line to stderr on rank 0 only (what ``--resume latest`` skipped)."""
    return lambda text: print(text, file=sys.stderr, flush=True) if dist_info.is_main else None


def say_threads(requested: int | None, say: bool) -> None:
    """Set the intra-op threads (:mod:`randsac_fast.runtime.threads`); rank 0 states the choice."""
    line = set_threads(requested)
    if say:
        print(line, file=sys.stderr, flush=True)


def fitted_warmup(args, per_epoch: int, total: int, say: bool) -> int:
    """--warmup-epochs in steps, scaled to a tenth of the run when longer than half of it (one
    warning line on rank 0; :func:`randsac_fast.runtime.schedule.fit_warmup`)."""
    warmup, note = fit_warmup(round(args.warmup_epochs * per_epoch), total, f"--warmup-epochs {args.warmup_epochs:g}")
    if note and say:
        print(note, file=sys.stderr, flush=True)
    return warmup


def metrics_logger(args, enabled: bool, total: int, step: int) -> MetricsLogger:
    """The evaluation commands' logger: their flags as hparams, val_top1 beside them, wandb if asked."""
    return MetricsLogger(args.out, enabled, total, step, config=vars(args), metric_tags=("loss", "val_top1"),
                         wandb={"project": args.wandb_project} if args.wandb else None)


#: Constraints of the flags every evaluation command shares (add_run_args) and of the probe's.
RUN_RULES = {"out": config_mod.writable_dir(), "epochs": config_mod.positive(),
             "warmup_epochs": config_mod.non_negative(), "batch_size": config_mod.at_least(1),
             "blr": config_mod.positive(), "min_lr": config_mod.non_negative(),
             "ckpt_every": config_mod.at_least(1), "keep": config_mod.at_least(1),
             "eval_every": config_mod.at_least(1), "log_every": config_mod.at_least(1),
             "workers": config_mod.at_least(0), "seed": config_mod.seed_value(),
             "device": config_mod.RULES["device"], "threads": config_mod.RULES["threads"]}


@dataclass(frozen=True)
class Probe:
    """What differs between probes of a frozen encoder (the linear probe here, the attentive probe in
    :mod:`randsac_fast.eval.attnprobe`); the loop, data, schedule, resume and summary are shared."""

    task: str                                        # recorded in checkpoints ("linprobe", "attnprobe")
    build_parser: Callable[[], argparse.ArgumentParser]
    features: Callable                               # (encoder, images, args) -> what the head reads
    head: Callable                                   # (encoder, num_classes, args) -> nn.Module
    optimizer: Callable                              # (parameters, lr, args) -> torch.optim.Optimizer


LINEAR = Probe("linprobe", build_parser,
               features=lambda encoder, images, args: pooled(encoder, images, args.cls_token),
               head=lambda encoder, num_classes, args: ProbeHead(encoder.config.embed_dim, num_classes),
               optimizer=lambda params, lr, args: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.0))


@releasing_locks
def run(argv=None, probe: Probe = LINEAR) -> dict:
    """Train the probe; returns the final {'top1', 'top5', ...}. Raises on bad input."""
    args = probe.build_parser().parse_args(argv)
    config_mod.check_args(args, RUN_RULES)
    # ---- cheap validation before any process group exists -----------------------------------
    if args.wandb:
        require_wandb()
    train_src, val_src = labelled_splits(args.data)
    encoder, meta = load_encoder(args.ckpt, args.model, interop.parse_sets(args.set), args.backend)
    check_channels(encoder, train_src, args.ckpt)
    if getattr(args, "cls_token", False) and encoder.num_prefix_tokens == 0:
        raise ValueError(f"--cls-token: {type(encoder).__name__} has no cls token; drop --cls-token to "
                         "average-pool the patch tokens")
    num_classes = int(max(train_src.label(i) for i in range(len(train_src)))) + 1
    img_size = encoder.img_size[0]
    mean, std = norm_stats(meta, train_src)

    dist_info = init_distributed(args.device)
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world
    say_threads(args.threads, dist_info.is_main)
    lock_run_dir(args.out, dist_info.is_main, "linprobe", args.force)   # its own directory, one run at a time
    collectives.barrier()
    torch.manual_seed(args.seed)                       # the same head on every rank
    encoder = encoder.to(device).eval().requires_grad_(False)
    head = probe.head(encoder, num_classes, args).to(device)
    ddp_head = nn.parallel.DistributedDataParallel(head, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- data, schedule, optimizer -----------------------------------------------------------
    augment = (data_mod.Augment(img_size, (0.08, 1.0), (3 / 4, 4 / 3), True, mean, std) if args.augment == "mae"
               else eval_transform(img_size, mean, std))
    dataset = data_mod.AugmentedDataset(train_src, augment, args.seed)
    batches = data_mod.ShardedBatches(len(train_src), args.batch_size, rank, world, args.seed)
    per_epoch = batches.per_epoch
    total = max(1, round(args.epochs * per_epoch))
    warmup = fitted_warmup(args, per_epoch, total, dist_info.is_main)
    global_batch = args.batch_size * world
    peak_lr = scaled_lr(args.blr, global_batch)
    optimizer = probe.optimizer(ddp_head.parameters(), peak_lr, args)

    # ---- resume ------------------------------------------------------------------------------
    gen = torch.Generator()                             # the checkpoint's per-rank RNG slot
    ckpt = Checkpointer(args.out, args.keep, rank, world)
    step, last = 0, None
    if args.resume:
        path = ckpt.resolve(args.resume, say=_say(dist_info))
        if path is not None:
            task = read_meta(path).get("task")       # before loading: another probe's head does not fit
            if task != probe.task:
                raise ValueError(f"--resume {path} is a {task} checkpoint, not a {probe.task} one; "
                                 "resume it with its own command or pass another --out")
            saved, state = ckpt.load(path, ddp_head, optimizer)
            if saved.get("encoder") != args.ckpt:
                warnings.warn(f"--resume {path} probed --ckpt {saved.get('encoder')}, this run passes {args.ckpt}",
                              stacklevel=2)
            if state is not None:
                set_rng_state(state, gen)
            step, last = saved["step"], path
    metrics = metrics_logger(args, dist_info.is_main, total, step)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")

    def logits_of(images: Tensor) -> Tensor:
        with autocast:
            feats = probe.features(encoder, images, args)
        return head(feats)                              # the head stays in fp32

    # ---- the loop ----------------------------------------------------------------------------
    stream = data_mod.batch_stream(dataset, batches, step, args.workers, pin_memory=device.type == "cuda")
    view = eval_transform(img_size, mean, std)
    result, pending, tick, tick_step = {}, [], time.perf_counter(), step
    while step < total:
        set_lr(optimizer, lr_at(step, total, warmup, peak_lr, args.min_lr))
        images, labels, _ = next(stream)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.no_grad(), autocast:
            feats = probe.features(encoder, images, args)
        ddp_head.train()
        loss = F.cross_entropy(ddp_head(feats), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        pending.append(loss.detach())
        epoch, end_of_epoch = step / per_epoch, step % per_epoch == 0 or step == total
        eval_now = end_of_epoch and (step == total or round(epoch) % args.eval_every == 0)
        if eval_now or step % args.log_every == 0:
            mean_loss = torch.stack(pending).mean()
            mean_loss = collectives.all_reduce(mean_loss)
            rate = (step - tick_step) * global_batch / (time.perf_counter() - tick)
            record = {"step": step, "epoch": epoch, "loss": float(mean_loss) / world,
                      "lr": optimizer.param_groups[0]["lr"], "img_per_s": rate}
            if eval_now:
                head.eval()
                result = evaluate(logits_of, val_src, view, args.batch_size, dist_info)
                record.update(val_top1=result["top1"], val_top5=result["top5"])
            metrics.log(record)
            pending, tick, tick_step = [], time.perf_counter(), step
        if end_of_epoch and (step == total or round(epoch) % args.ckpt_every == 0):
            last = ckpt.save(step, ddp_head, optimizer, {"task": probe.task, "encoder": args.ckpt, "total_steps": total,
                                                  "args": vars(args)}, rng_state(gen))
    metrics.close()
    if not result:   # resumed at the end: evaluate what was loaded
        head.eval()
        result = evaluate(logits_of, val_src, view, args.batch_size, dist_info)
    results_file = os.path.join(args.out, "results.json")
    if dist_info.is_main:
        write_results(args.out, {**result, "step": step, "ckpt": args.ckpt, "data": args.data, "args": vars(args)})
    return {**result, "step": step, "checkpoint": last, "results_file": results_file}


def cli(run_fn, argv=None, summarise=None) -> int:
    """Run an evaluation command: bad input -> one line on stderr and exit code 1, no traceback;
    success -> ``summarise(args, result)`` on rank 0 (the closing summary)."""
    from .. import started
    started()                    # Ctrl-C is this command's to handle from here
    def body(argv):
        result = run_fn(argv)
        if summarise is not None and dist.is_initialized() and dist.get_rank() == 0:
            summarise(run_fn.__module__, argv, result)
    try:
        return run_command(body, argv, errors=(ValueError, TypeError, OSError, ImportError,
                                               ops.BackendUnavailable))
    finally:
        release_all()           # the run-directory lock


def summarise(module: str, argv, result: dict) -> None:
    """The closing block of linprobe / attnprobe / finetune; a probe's next step is fine-tuning the
    same encoder."""
    import importlib
    args = importlib.import_module(module).build_parser().parse_args(argv)
    task = {"linprobe": "linear probe", "attnprobe": "attentive probe"}.get(module.rpartition(".")[2], "fine-tune")
    steps = None
    if task != "fine-tune":
        model_args = ((["--model", args.model] if args.model else []) + [a for s in args.set for a in ("--set", s)]
                      + (["--cls-token"] if getattr(args, "cls_token", False) else []))   # SAIM: classify from what was probed
        steps = {"fine-tune": command("finetune", "--ckpt", args.ckpt, *model_args, "--data", args.data,
                                      "--out", os.path.join(os.path.dirname(os.path.normpath(args.out)), "finetune"))}
    eval_summary(task, args.out, result.get("checkpoint"), result, result["results_file"], steps)


def main(argv=None) -> int:
    return cli(run, argv, summarise)


if __name__ == "__main__":
    sys.exit(main())
