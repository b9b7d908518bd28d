"""Fine-tune a pre-trained encoder end to end: ``torchrun -m randsac_fast.finetune --ckpt CKPT --data DATA``.

The papers' recipe (RandSAC App. D and SAIM App. C follow MAE's fine-tuning): AdamW (betas 0.9,
0.999, weight decay 0.05), layer-wise lr decay 0.65, drop path 0.1, label smoothing 0.1, mixup 0.8 /
cutmix 1.0, RandAugment (m9, mstd 0.5), linear warmup then cosine decay; the classifier reads the
average of the last block's (normed) patch tokens, or SAIM's cls token with ``--cls-token``.

timm (the ``timm`` extra) supplies RandAugment and mixup / cutmix when it is installed. Without
it, mixup / cutmix with label smoothing run from the small functions below and RandAugment is
skipped with a warning naming the package.

Hand-written on purpose: drop path, the layer-wise decay groups and the fallback mixup are a few
lines each, while timm (which has them) brings a CUDA build of torch, so it stays an optional extra;
the soft-target loss is torch's own ``F.cross_entropy`` with probability targets.

Distribution: FSDP2 per block and at the root (:func:`randsac_fast.runtime.parallel.parallelize`), as in
pre-training; data sharding, schedule, metrics and DCP checkpoints are the trainer's components.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import config as config_mod
from .. import data as data_mod
from .. import interop, ops
from ..runtime import collectives
from ..runtime.checkpoint import Checkpointer, rng_state, set_rng_state
from ..runtime.lock import lock_run_dir, releasing_locks
from .linprobe import (RUN_RULES, _say, add_run_args, check_channels, cli, eval_transform, evaluate, fitted_warmup,
                       labelled_splits, load_encoder, metrics_logger, norm_stats, say_threads, summarise)
from ..runtime.metrics import require_wandb
from ..runtime.summary import write_results
from ..runtime.parallel import init_distributed, parallelize
from ..runtime.schedule import lr_at, scaled_lr

__all__ = ["drop_path", "DropPathBlock", "Classifier", "layer_id", "param_groups_lrd", "set_group_lrs",
           "smooth_one_hot", "mix_batch", "make_mixer", "posterize_keep_bits", "FinetuneAugment", "run", "main"]


# --------------------------------------------------------------------------------------------
# The classifier: the pre-trained encoder with stochastic depth, and a linear head
# --------------------------------------------------------------------------------------------
def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop a residual branch x [B, ...] per sample with probability p, scale the rest."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class DropPathBlock(nn.Module):
    """A ``models.vit.Block`` with drop path on both residual branches. It holds the block's own
    submodules under the same names, so state-dict keys are unchanged (``blocks.3.attn.qkv.weight``)."""

    def __init__(self, block: nn.Module, drop_prob: float):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.drop_prob = drop_prob

    def forward(self, x: Tensor, bounds) -> Tensor:
        """x: [B, N, D]; bounds: a ``randsac_fast.ops.SegmentBounds`` shared by every block."""
        x = x + drop_path(self.attn(self.norm1(x), bounds), self.drop_prob, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_prob, self.training)


class Classifier(nn.Module):
    """images [B, C, H, W] -> logits [B, K]. Keeps only the encoder of a RandSAC / SAIM model
    (patch embedding, fixed position embeddings, cls token for SAIM, blocks, final norm); the
    decoder / query stream / pixel head of pre-training are dropped."""

    def __init__(self, encoder: nn.Module, num_classes: int, drop_path_rate: float = 0.1, cls_token: bool = False):
        super().__init__()
        self.num_prefix_tokens = encoder.num_prefix_tokens
        if cls_token and not self.num_prefix_tokens:
            raise ValueError(f"--cls-token: {type(encoder).__name__} has no cls token; drop --cls-token to "
                             "average-pool the patch tokens")
        self.use_cls, self.img_size, self.in_chans = cls_token, encoder.img_size, encoder.in_chans
        self.patch_embed = encoder.patch_embed
        self.register_buffer("pos_embed", encoder.pos_embed.detach().clone(), persistent=False)
        self.cls_token = encoder.cls_token if self.num_prefix_tokens else None
        depth = len(encoder.blocks)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()   # deeper blocks dropped more (timm)
        self.blocks = nn.ModuleList(DropPathBlock(b, r) for b, r in zip(encoder.blocks, rates))
        self.norm = encoder.norm
        self.head = nn.Linear(encoder.config.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)   # MAE's fine-tuning init
        nn.init.zeros_(self.head.bias)

    def forward_features(self, images: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, prefix + N, D], raster order, unmasked (as the encoder's own)."""
        x = self.patch_embed(images)                     # in the compute dtype
        pos = self.pos_embed.to(x.dtype)
        x = x + pos[:, self.num_prefix_tokens:]
        if self.cls_token is not None:
            cls = (self.cls_token.to(x.dtype) + pos[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        seg = torch.zeros(x.shape[:2], dtype=torch.int32, device=x.device)   # every token sees all
        bounds = ops.segment_bounds(seg, seg, inclusive=True)
        for blk in self.blocks:
            x = blk(x, bounds)
        return self.norm(x)

    def forward(self, images: Tensor) -> Tensor:
        x = self.forward_features(images)
        return self.head(x[:, 0] if self.use_cls else x[:, self.num_prefix_tokens:].mean(dim=1))


# --------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay (BEiT / MAE)
# --------------------------------------------------------------------------------------------
def layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings, i + 1 for block i, num_layers + 1 for the final norm and the head."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups, one per (layer, decay or not): lr_scale = layer_decay ** (num_layers + 1 - layer);
    no weight decay on biases, norms and other 1-D parameters."""
    num_layers = len(model.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid, decay = layer_id(name, num_layers), p.ndim > 1 and not name.endswith(".bias")
        group = groups.setdefault((lid, decay), {
            "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_layers + 1 - lid)})
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def set_group_lrs(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# --------------------------------------------------------------------------------------------
# Mixup / cutmix with label smoothing (timm's when installed)
# --------------------------------------------------------------------------------------------
def smooth_one_hot(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """[B] -> [B, K]: 1 - smoothing + smoothing / K on the label, smoothing / K elsewhere (timm's)."""
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(
        1, labels[:, None], 1.0 - smoothing + off)


def mix_batch(images: Tensor, labels: Tensor, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
              switch_prob: float = 0.5, smoothing: float = 0.1, rng: np.random.Generator | None = None):
    """Mix each image with its partner in the reversed batch -> (images, soft targets [B, K]).

    One λ per batch. Cutmix (with probability switch_prob when both are on) pastes a box of area
    1 - λ from the partner, and λ is then set to the box's exact share; mixup blends the images.
    Targets blend the same way: λ · y + (1 - λ) · y_partner, each label-smoothed, so rows sum to 1.
    """
    rng = rng or np.random.default_rng()
    target = smooth_one_hot(labels, num_classes, smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, target
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
    partner = images.flip(0)
    if use_cutmix:
        h, w = images.shape[-2:]
        ch, cw = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        images = images.clone()
        images[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        images = images * lam + partner * (1.0 - lam)
    return images, target * lam + target.flip(0) * (1.0 - lam)


def make_mixer(num_classes: int, mixup_alpha: float, cutmix_alpha: float, smoothing: float, seed: int):
    """(images, labels, step) -> (images, soft targets): timm's Mixup when installed, else
    :func:`mix_batch`. The draws of a step depend only on (seed, step), so a resumed run repeats them."""
    try:
        from timm.data import Mixup
    except ImportError:
        return lambda x, y, step: mix_batch(x, y, num_classes, mixup_alpha, cutmix_alpha, 0.5, smoothing,
                                            np.random.default_rng([seed, step]))
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return lambda x, y, step: (x, smooth_one_hot(y, num_classes, smoothing))
    mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=smoothing,
                  num_classes=num_classes)

    def mix(x, y, step):
        np.random.seed([seed % 2**32, step])     # timm draws from NumPy's global generator
        return mixup(x, y)
    return mix


def posterize_keep_bits(img, bits_to_keep: int, **_):
    """Keep the ``bits_to_keep`` most significant bits of each channel of a PIL image; keeping 0
    (or fewer) bits leaves none: a black image.

    timm's RandAugment posterize ops derive the bits from the magnitude: ``PosterizeIncreasing``
    (the ``inc1`` recipe, MAE's) keeps ``4 - int(m / 10 * 4)`` bits, so magnitude 10 keeps 0.
    With ``mstd0.5`` around ``m9`` the magnitude is drawn from N(9, 0.5) and clipped to 10, which
    happens on one draw in 44; ``Posterize`` (``inc0``) keeps ``int(m / 10 * 4)``, 0 below m 2.5.
    Pillow < 13 computed 0 bits as this black image (as TensorFlow's reference RandAugment does),
    Pillow 13 refuses bits outside 1..8 ("bits must be between or equal to 1 and 8"), which ended
    fine-tuning after a few steps. Computing 0 bits here keeps the papers' recipe as they ran it,
    on every Pillow version; 1..8 bits go to Pillow unchanged.
    """
    from PIL import Image, ImageOps
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)           # every bit dropped: 0 in every channel
    return img if bits_to_keep >= 8 else ImageOps.posterize(img, bits_to_keep)


def _keep_zero_bit_posterize(randaug) -> None:
    """Route timm's posterize ops through :func:`posterize_keep_bits` (see there for why)."""
    ops = getattr(randaug, "ops", None)
    if ops is None:
        import timm
        raise RuntimeError(f"timm {timm.__version__}'s RandAugment has no .ops list; randsac_fast supports "
                           "timm 1.x (pip install 'timm>=1,<2')")
    for op in ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize_keep_bits


_RANDAUG_FORM = ("write 'rand' then '-' separated KEYVALUE sections, KEY one of m (magnitude), n (ops per image), "
                 "mstd, mmax, inc, p, w, e.g. rand-m9-mstd0.5-inc1, or '' for none")
_RANDAUG_KEY = re.compile(r"^(mstd|mmax|inc|m|n|p|w)(\d+(\.\d*)?|\.\d+)$")


def check_randaug(spec: str) -> None:
    """Refuse a malformed timm RandAugment spec by name (timm itself only asserts)."""
    parts = spec.split("-")
    bad = next((p for p in parts[1:] if not _RANDAUG_KEY.match(p)), None) if parts[0] == "rand" else parts[0]
    if bad is not None:
        raise ValueError(f"--randaug {spec!r}: cannot read section {bad!r}; {_RANDAUG_FORM}")


class FinetuneAugment:
    """RandomResizedCrop + flip (the trainer's), then timm's RandAugment when installed, then normalise."""

    def __init__(self, img_size: int, mean, std, randaug: str | None = "rand-m9-mstd0.5-inc1"):
        self.img_size, self.mean, self.std = img_size, tuple(mean), tuple(std)
        zero, one = (0.0,) * len(self.mean), (1.0,) * len(self.mean)
        self.crop = data_mod.Augment(img_size, (0.08, 1.0), (3 / 4, 4 / 3), True, zero, one)   # unnormalised
        self.randaug = None
        if randaug:
            check_randaug(randaug)
            try:
                from timm.data.auto_augment import rand_augment_transform
                fill = tuple(round(255 * m) for m in self.mean)
                try:
                    self.randaug = rand_augment_transform(randaug, {"img_mean": fill})
                except (AssertionError, ValueError, KeyError, IndexError) as e:   # timm asserts on bad specs
                    raise ValueError(f"--randaug {randaug!r} is not a RandAugment spec timm accepts ({e or 'rejected'}); "
                                     f"{_RANDAUG_FORM}") from None
                _keep_zero_bit_posterize(self.randaug)
            except ImportError:
                warnings.warn("RandAugment skipped: it needs timm (pip install timm; note that timm's torchvision "
                              "makes pip replace a CPU torch with a CUDA build of several GB)", stacklevel=2)
        #: the RandAugment spec actually applied (None: none, e.g. timm is not installed)
        self.randaug_applied = randaug if self.randaug is not None else None

    def __call__(self, img: Tensor, g: torch.Generator) -> Tensor:
        out = self.crop(img, g)
        if self.randaug is not None:
            from PIL import Image
            # timm draws from Python's and NumPy's global generators: seed them from this sample's
            # generator so a sample's augmentation stays a function of (seed, epoch, index).
            s = int(torch.randint(2**31, (1,), generator=g))
            random.seed(s)
            np.random.seed(s)
            pil = Image.fromarray((out.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).squeeze(-1).numpy())
            arr = np.asarray(self.randaug(pil), dtype=np.float32) / 255.0
            out = torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1)).permute(2, 0, 1).contiguous()
        return data_mod.normalize(out, self.mean, self.std)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = config_mod.Parser(prog="python -m randsac_fast.finetune",
                                description="Fine-tune a RandSAC / SAIM encoder for classification (FSDP2; "
                                            "torchrun for several processes).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    interop.add_checkpoint_args(p)
    p.add_argument("--data", required=True, help="digits, a directory with train/ and val/, or CIFAR pickles")
    p.add_argument("--out", default="runs/finetune", help="run directory: metrics.jsonl, checkpoints")
    p.add_argument("--epochs", type=float, default=100, help="training epochs (MAE ViT-B: 100)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--warmup-epochs", type=float, default=5, help="linear warmup epochs")
    p.add_argument("--batch-size", type=int, default=64, help="images per rank per step")
    p.add_argument("--blr", type=float, default=5e-4, help="base lr; lr = blr * global batch / 256")
    p.add_argument("--min-lr", type=float, default=1e-6, help="final lr of the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--layer-decay", type=float, default=0.65, help="layer-wise lr decay")
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate of the last block")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    p.add_argument("--randaug", default="rand-m9-mstd0.5-inc1", help="timm RandAugment spec ('' : off)")
    p.add_argument("--augment", choices=("mae", "none"), default="mae",
                   help="mae: RandomResizedCrop(0.08, 1) + flip + RandAugment; none: the evaluation view")
    p.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm (None: off)")
    p.add_argument("--cls-token", action=argparse.BooleanOptionalAction, default=False,
                   help="classify from the cls token (SAIM)")
    add_run_args(p, log_every=10)
    return p


FINETUNE_RULES = {**RUN_RULES, "steps": config_mod.optional(config_mod.at_least(1)),
                  "weight_decay": config_mod.non_negative(),
                  "layer_decay": config_mod.Rule(lambda x: 0 < x <= 1, "a number in (0, 1]"),
                  "drop_path": config_mod.fraction(), "smoothing": config_mod.fraction(),
                  "mixup": config_mod.non_negative(), "cutmix": config_mod.non_negative(),
                  "clip_grad": config_mod.optional(config_mod.positive())}


def _check_randaug_flag(args) -> None:
    if args.randaug:
        check_randaug(args.randaug)


@releasing_locks
def run(argv=None) -> dict:
    """Fine-tune; returns the final {'top1', 'top5', 'losses', ...}. Raises on bad input."""
    args = build_parser().parse_args(argv)
    config_mod.check_args(args, FINETUNE_RULES)
    _check_randaug_flag(args)          # before anything is loaded
    if args.batch_size < 1 or (args.batch_size % 2 and (args.mixup > 0 or args.cutmix > 0)):
        raise ValueError(f"--batch-size must be a positive even number with mixup / cutmix (images are mixed in "
                         f"pairs); got {args.batch_size}")
    if args.wandb:
        require_wandb()
    train_src, val_src = labelled_splits(args.data)
    encoder, meta = load_encoder(args.ckpt, args.model, interop.parse_sets(args.set), args.backend)
    check_channels(encoder, train_src, args.ckpt)
    num_classes = int(max(train_src.label(i) for i in range(len(train_src)))) + 1
    img_size = encoder.img_size[0]
    mean, std = norm_stats(meta, train_src)

    dist_info = init_distributed(args.device)
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world
    say_threads(args.threads, dist_info.is_main)
    lock_run_dir(args.out, dist_info.is_main, "finetune", args.force)   # its own directory, one run at a time
    collectives.barrier()
    torch.manual_seed(args.seed)                      # the same head on every rank
    model = Classifier(encoder, num_classes, args.drop_path, args.cls_token)
    del encoder                                        # decoder / query stream are not needed
    model = parallelize(model.to(device), dist_info)
    optimizer = torch.optim.AdamW(param_groups_lrd(model, args.weight_decay, args.layer_decay), betas=(0.9, 0.999))

    augment = (FinetuneAugment(img_size, mean, std, args.randaug or None) if args.augment == "mae"
               else eval_transform(img_size, mean, std))
    dataset = data_mod.AugmentedDataset(train_src, augment, args.seed)
    batches = data_mod.ShardedBatches(len(train_src), args.batch_size, rank, world, args.seed)
    per_epoch = batches.per_epoch
    total = args.steps or max(1, round(args.epochs * per_epoch))
    warmup = fitted_warmup(args, per_epoch, total, dist_info.is_main)
    global_batch = args.batch_size * world
    peak_lr = scaled_lr(args.blr, global_batch)
    mixer = make_mixer(num_classes, args.mixup, args.cutmix, args.smoothing, data_mod.sample_seed(args.seed, -4, rank))

    gen = torch.Generator()
    torch.manual_seed(data_mod.sample_seed(args.seed, -3, rank))   # per-rank drop-path draws
    ckpt = Checkpointer(args.out, args.keep, rank, world)
    step, last = 0, None
    if args.resume:
        path = ckpt.resolve(args.resume, say=_say(dist_info))
        if path is not None:
            saved, state = ckpt.load(path, model, optimizer)
            if saved.get("task") != "finetune":
                raise ValueError(f"--resume {path} is not a fine-tuning checkpoint")
            if state is not None:
                set_rng_state(state, gen)
            step, last = saved["step"], path
    metrics = metrics_logger(args, dist_info.is_main, total, step)
    view = eval_transform(img_size, mean, std)

    stream = data_mod.batch_stream(dataset, batches, step, args.workers, pin_memory=device.type == "cuda")
    result, losses, pending, tick, tick_step = {}, [], [], time.perf_counter(), step
    while step < total:
        set_group_lrs(optimizer, lr_at(step, total, warmup, peak_lr, args.min_lr))
        images, labels, _ = next(stream)
        images, targets = mixer(images.to(device, non_blocking=True), labels.to(device, non_blocking=True), step)
        model.train()
        loss = F.cross_entropy(model(images).float(), targets)   # soft targets: -sum(t * log p), batch mean
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()
        step += 1
        pending.append(loss.detach())
        epoch, end_of_epoch = step / per_epoch, step % per_epoch == 0 or step == total
        eval_now = end_of_epoch and (step == total or round(epoch) % args.eval_every == 0)
        if eval_now or step % args.log_every == 0:
            step_losses = collectives.all_reduce(torch.stack(pending))
            losses += (step_losses / world).tolist()
            rate = (step - tick_step) * global_batch / (time.perf_counter() - tick)
            record = {"step": step, "epoch": epoch, "loss": losses[-1],
                      "mean_loss": sum(losses[-len(pending):]) / len(pending),
                      "lr": max(g["lr"] for g in optimizer.param_groups), "img_per_s": rate}  # the head's lr
            if eval_now:
                model.eval()
                result = evaluate(model, val_src, view, args.batch_size, dist_info)
                record.update(val_top1=result["top1"], val_top5=result["top5"])
            metrics.log(record)
            pending, tick, tick_step = [], time.perf_counter(), step
        if end_of_epoch and (step == total or round(epoch) % args.ckpt_every == 0):
            last = ckpt.save(step, model, optimizer, {"task": "finetune", "encoder": args.ckpt, "total_steps": total,
                                               "args": vars(args)}, rng_state(gen))
    metrics.close()
    if not result:
        model.eval()
        result = evaluate(model, val_src, view, args.batch_size, dist_info)
    results_file = os.path.join(args.out, "results.json")
    # What ran, not only what was asked: RandAugment is skipped without timm.
    applied = {"randaug_applied": getattr(augment, "randaug_applied", None)}
    if dist_info.is_main:
        write_results(args.out, {**result, "step": step, "ckpt": args.ckpt, "data": args.data, **applied,
                                 "args": vars(args)})
    # losses: every step of this run, rank mean
    return {**result, **applied, "step": step, "losses": losses, "checkpoint": last, "results_file": results_file}


def main(argv=None) -> int:
    return cli(run, argv, summarise)


if __name__ == "__main__":
    sys.exit(main())
