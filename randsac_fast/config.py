"""Trainer configuration: one typed structure, filled from a preset, a ``--config`` file, then flags.

Sections mirror the trainer's component files (model, data, optim, train). Every field carries a
one-line doc that becomes its ``--help`` text; every field is a flag ``--field-name`` (booleans
``--x`` / ``--no-x``, lists comma-separated). ``--config run.toml`` (or the ``config.json`` a run
wrote) reproduces a run; flags given with it override it.

Hand-written on purpose: the parser generator is ~100 lines of stdlib argparse over the dataclasses;
libraries that do this (tyro, jsonargparse, simple-parsing) would add a dependency and still need
the preset layer and the help that shows the preset's values.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field

__all__ = ["ModelConfig", "DataConfig", "OptimConfig", "TrainConfig", "Config", "PRESETS", "parse_args",
           "load_config_file", "to_dict"]


def doc(text: str, default=None, **kw):
    """A dataclass field with a one-line doc (shown by --help)."""
    if "default_factory" in kw:
        return field(metadata={"doc": text}, **kw)
    return field(default=default, metadata={"doc": text})


@dataclass
class ModelConfig:
    model: str = doc("model name: randsac_vit_{tiny,small,base,large}, saim_vit_{...} or aim_vit_{...}",
                     "randsac_vit_tiny")
    img_size: int = doc("input image side in pixels (images are cropped/resized to it)", 32)
    patch_size: int = doc("patch side in pixels; img_size must be a multiple of it", 4)
    embed_dim: int | None = doc("encoder width (None: the model's default)")
    depth: int | None = doc("encoder blocks (None: the model's default)")
    num_heads: int | None = doc("encoder attention heads (None: the model's default)")
    decoder_depth: int | None = doc("RandSAC decoder blocks (None: the model's default)")
    decoder_num_heads: int | None = doc("RandSAC decoder attention heads (None: the model's default)")
    query_depth: int | None = doc("SAIM query-stream blocks (None: the model's default)")
    share_weight: bool | None = doc("SAIM: query stream shares the encoder's weights")
    head: str | None = doc("SAIM prediction head: mlp or linear")
    skip_memory: bool | None = doc("RandSAC: trainable skip connections from every encoder layer")
    head_depth: int | None = doc("AIM: residual MLP blocks of the prediction head (None: the model's default)")
    blur_kernel: int | None = doc("Gaussian blur kernel of the targets (0: none; SAIM uses 9)")
    blur_sigma: float | None = doc("Gaussian blur sigma of the targets")
    norm_pix: bool | None = doc("regress per-patch normalised pixels (MAE norm-pix)")
    loss: str | None = doc("reconstruction loss: mse or l1")
    backend: str = doc("attention/ops backend: auto, reference, sdpa, flex, xformers, triton, cuda", "auto")


@dataclass
class DataConfig:
    data: str = doc("digits (built in), synthetic, a directory (ImageFolder tree or CIFAR-10/100 python "
                    "pickles), or WebDataset tar shards: 'shards/train-{000000..001023}.tar'", "digits")
    crop_scale: tuple[float, float] = doc("RandomResizedCrop area scale range",
                                          default_factory=lambda: (0.2, 1.0))
    crop_ratio: tuple[float, float] = doc("RandomResizedCrop aspect-ratio range",
                                          default_factory=lambda: (3 / 4, 4 / 3))
    hflip: bool = doc("random horizontal flip with probability 0.5", True)
    mean: tuple[float, ...] | None = doc("normalisation mean per channel (None: the data set's own)")
    std: tuple[float, ...] | None = doc("normalisation std per channel (None: the data set's own)")
    workers: str = doc("dataloader worker processes per rank: a number, or auto = this node's cores / local "
                       "ranks - 1 (one core per rank stays with the training process), at most 16", "auto")
    synthetic_size: int = doc("number of images of the synthetic source", 4096)
    knn_data: str | None = doc("labelled data of the k-NN monitor: digits, a directory with train/ and val/, "
                               "or CIFAR pickles (None: --data)")


@dataclass
class OptimConfig:
    blr: float = doc("base learning rate; lr = blr * effective batch / 256", 1.5e-4)
    min_lr: float = doc("final learning rate of the cosine decay", 0.0)
    weight_decay: float = doc("AdamW weight decay (not applied to biases, norms, 1-D params)", 0.05)
    betas: tuple[float, float] = doc("AdamW betas", default_factory=lambda: (0.9, 0.95))
    warmup_steps: int | None = doc("linear warmup in optimizer steps (None: from warmup_epochs)")
    warmup_epochs: float = doc("linear warmup in epochs (used when warmup_steps and warmup_frac are None)", 0.0)
    warmup_frac: float | None = doc("linear warmup as a fraction of the run's optimizer steps (used when "
                                    "warmup_steps is None)")
    clip_grad: float | None = doc("clip the gradient norm to this value (None: no clipping)")


@dataclass
class TrainConfig:
    out: str = doc("run directory: config, metrics.jsonl, checkpoints", "runs/default")
    steps: int | None = doc("optimizer steps to train (overrides epochs)")
    epochs: float = doc("epochs to train when steps is None", 1.0)
    batch_size: int = doc("global batch: images per optimizer step over all processes (per rank: "
                          "batch_size / (processes * accum); must divide exactly)", 256)
    accum: int | None = doc("gradient accumulation micro-batches per optimizer step (None: the fewest "
                            "that keep each rank's micro-batch within --micro-batch; 1 without it)")
    micro_batch: int | None = doc("largest micro-batch per rank, for memory (None: no cap)")
    seed: int = doc("random seed (model init, data order, augmentation, segment orders)", 0)
    order: str = doc("segment-order spec, e.g. random, raster, square:16/4, blob:11/5, prefix", "square:16/4")
    resume: str | None = doc("'latest' (newest checkpoint in --out) or a checkpoint directory")
    ckpt_every: int = doc("save a checkpoint every K optimizer steps (0: only at the end)", 0)
    keep: int = doc("keep the last K checkpoints", 2)
    allow_changed: bool = doc("resume although training settings (batch size, seed, order, lr, steps, ...) differ "
                              "from the checkpoint's; each change is printed (model-shape changes never resume)",
                              False)
    force: bool = doc("start from scratch in an --out that already holds checkpoints (they are kept; the new run "
                      "writes a new branch of checkpoints), or write into an --out that holds another command's "
                      "files", False)
    log_every: int = doc("log metrics every K optimizer steps", 10)
    compile: str = doc("torch.compile: none; block (each transformer block); whole (the model's forward + "
                       "loss as one fullgraph graph); whole-cudagraphs (whole with mode='reduce-overhead', "
                       "CUDA-graph replay; GPU only, unmeasured until a GPU run)", "none")
    ac: bool = doc("activation checkpointing of each transformer block", False)
    fsdp_units: str = doc("FSDP2 units when the model is sharded: block (one per transformer block: all-gathers "
                          "overlap compute, one block's parameters live at a time), root (one unit: one "
                          "all-gather and one reduce-scatter per step), auto = block on CUDA, root on CPU "
                          "(gloo collectives do not overlap compute)", "auto")
    master_weights: bool = doc("at world size 1 with bf16 compute (CUDA): a bf16 copy of the model computes and "
                               "the fp32 model holds the master weights, without FSDP2 (FSDP2's mixed-precision "
                               "numerics, without its per-parameter casts, all-gathers and hooks); "
                               "--no-master-weights wraps with FSDP2 as at larger world sizes", True)
    probe: bool = doc("after training, fit a linear probe on frozen avg-pooled features (digits only)",
                      False)
    knn_every: int = doc("every K optimizer steps, log knn_top1: weighted k-NN accuracy of the encoder's "
                         "avg-pooled features on a labelled split (0: off)", 0)
    knn_k: int = doc("neighbours of the k-NN monitor", 20)
    knn_images: int | None = doc("at most this many images of each k-NN split (None: all)", 10000)
    device: str = doc("cuda or cpu (default: cuda when available)", "auto")
    threads: int | None = doc("intra-op CPU threads per process (None: OMP_NUM_THREADS when set, else the cores "
                              "available to this process / the processes on this node, as torchrun sets them)")
    wandb: bool = doc("also log to Weights & Biases (pip install wandb; WANDB_MODE=offline logs without an "
                      "account)", False)
    wandb_project: str = doc("Weights & Biases project of --wandb", "randsac_fast")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "digits"
    flags: list[str] = field(default_factory=list)   # the fields set on the command line
    # One-line notes on how the preset was adapted (printed at start-up; not part of the config).
    notes: list[str] = field(default_factory=list, compare=False)


# --------------------------------------------------------------------------------------------
# Presets: the papers' settings (source next to each) and the built-in digits demo. Batch sizes are
# global (all processes together), as the papers state them; the per-rank batch follows from the
# world size (randsac_fast.runtime.batch), so a preset trains the same on any number of processes.
# --------------------------------------------------------------------------------------------
_CIFAR = dict(img_size=32, patch_size=4, data="cifar10", crop_scale=(0.2, 1.0), blr=1e-3,
              weight_decay=0.05, betas=(0.9, 0.999), batch_size=512, warmup_epochs=10, epochs=1600,
              norm_pix=True)

PRESETS: dict[str, tuple[str, dict]] = {
    "digits": (
        "built-in demo: a tiny RandSAC ViT (4 encoder blocks, 1 decoder block, width 64) on the 8x8 "
        "digits with 2x2 patches, pre-trained on 75% of the images (square:4, global batch 128, 1500 steps), then "
        "a linear probe on the rest beside the random-init encoder and raw pixels",
        dict(model="randsac_vit_tiny", img_size=8, patch_size=2, embed_dim=64, depth=4, num_heads=2,
             decoder_depth=1, decoder_num_heads=2, norm_pix=False, order="square:4", data="digits",
             crop_scale=(0.8, 1.0), hflip=False, batch_size=128, blr=8e-3, betas=(0.9, 0.95),
             weight_decay=0.05, warmup_steps=20, steps=1500, log_every=100, probe=True,
             out="runs/digits")),
    "randsac_cifar10_square": (
        "RandSAC (Hua et al.) Sec. 5 + App. D.1, Tables 14/16: ViT-T, 32x32, P=4, 3-layer decoder, "
        "square 16->4, AdamW blr 1e-3 wd 0.05 betas (0.9, 0.999), batch 512, 10 warmup / 1600 epochs",
        dict(_CIFAR, model="randsac_vit_tiny", decoder_depth=3, order="square:16/4",
             out="runs/randsac_cifar10_square")),
    "randsac_cifar10_blob": (
        "RandSAC (Hua et al.) Sec. 5 + App. D.1: as randsac_cifar10_square with blob 11->5 segments",
        dict(_CIFAR, model="randsac_vit_tiny", decoder_depth=3, order="blob:11/5",
             out="runs/randsac_cifar10_blob")),
    "randsac_lowdata_cifar_vits": (
        "RandSAC (Hua et al.) Table 7 + App. D.1 low-data: ViT-S, 32x32, P=4, 6-layer decoder, "
        "square 16->4, CIFAR-10 (set --data to a CIFAR-100 directory for C-100)",
        dict(_CIFAR, model="randsac_vit_small", decoder_depth=6, order="square:16/4",
             out="runs/randsac_lowdata_vits")),
    "randsac_in100_vits": (
        "RandSAC (Hua et al.) App. D (ImageNet100 setting): ViT-S, 224x224, P=16 (14x14 tokens), "
        "4-layer decoder with double the encoder's heads (12); global batch 1024 (the paper gives none: "
        "128 per process on 8)",
        dict(model="randsac_vit_small", img_size=224, patch_size=16, decoder_depth=4,
             decoder_num_heads=12, order="square:16/4", data="imagenet100", crop_scale=(0.2, 1.0),
             blr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), batch_size=1024, warmup_epochs=10,
             epochs=400, norm_pix=True, out="runs/randsac_in100_vits")),
    "randsac_in1k_vitb": (
        "RandSAC (Hua et al.) App. D.2: ViT-B, 192x192 pre-training, P=16, square 16->4, "
        "8-layer decoder (MAE-style AdamW recipe, blr 1.5e-4, betas (0.9, 0.95)); global batch 1024 (the "
        "paper gives none: 128 per process on 8)",
        dict(model="randsac_vit_base", img_size=192, patch_size=16, decoder_depth=8,
             order="square:16/4", data="imagenet", crop_scale=(0.2, 1.0), blr=1.5e-4,
             weight_decay=0.05, betas=(0.9, 0.95), batch_size=1024, warmup_epochs=40, epochs=800,
             norm_pix=True, out="runs/randsac_in1k_vitb")),
    "saim_in1k_vitb": (
        "SAIM (Qi et al.) Sec. 4 + App. C Table 6: ViT-B, 224, query_depth 12, Gaussian blur 9 / "
        "sigma 1, norm-pix, AdamW blr 2e-4 wd 0.05 betas (0.9, 0.95), batch 2048, 30 warmup / 800 "
        "epochs, crop scale (0.67, 1)",
        dict(model="saim_vit_base", img_size=224, patch_size=16, query_depth=12, blur_kernel=9,
             blur_sigma=1.0, norm_pix=True, order="random", data="imagenet", crop_scale=(0.67, 1.0),
             blr=2e-4, weight_decay=0.05, betas=(0.9, 0.95), batch_size=2048, warmup_epochs=30,
             epochs=800, out="runs/saim_in1k_vitb")),
    "folder": (
        "your own images (an ImageFolder tree, or a root holding train/ and val/; the default for such a "
        "--data): RandSAC ViT-T at 64x64 with 8x8 patches (an 8x8 grid, small enough for a CPU try-out; raise "
        "--img-size for detail), 3-layer decoder, square 16->4, norm-pix, MAE augmentation (RandomResizedCrop "
        "scale 0.2-1 + flip), AdamW blr 1e-3 wd 0.05 betas (0.9, 0.95), global batch 64, warm-up 5% of the "
        "run, 100 epochs",
        dict(model="randsac_vit_tiny", img_size=64, patch_size=8, decoder_depth=3, order="square:16/4",
             norm_pix=True, crop_scale=(0.2, 1.0), hflip=True, blr=1e-3, weight_decay=0.05, betas=(0.9, 0.95),
             batch_size=64, warmup_frac=0.05, epochs=100, out="runs/folder")),
    "saim_digits": (
        "SAIM on the digits demo's scale, for comparing methods at equal steps: a tiny SAIM ViT (4 content blocks, "
        "one query block after each, width 64) on the 8x8 digits with 2x2 patches, random order, no blur and "
        "norm-pix off (2x2 patches of one channel), global batch 128, 1500 steps, then the linear probe",
        dict(model="saim_vit_tiny", img_size=8, patch_size=2, embed_dim=64, depth=4, num_heads=2, query_depth=4,
             blur_kernel=0, norm_pix=False, order="random", data="digits", crop_scale=(0.8, 1.0), hflip=False,
             batch_size=128, blr=8e-3, betas=(0.9, 0.95), weight_decay=0.05, warmup_steps=20, steps=1500,
             log_every=100, probe=True, out="runs/saim_digits")),
    "aim_digits": (
        "AIM-style demo: a tiny prefix-causal ViT (4 blocks, width 64, 2-block MLP head) on the 8x8 digits "
        "with 2x2 patches, raster order with a random prefix of 1..15 tokens per image, norm-pix off (2x2 "
        "patches of one channel hold 4 values), global batch 128, 1500 steps, then the linear probe",
        dict(model="aim_vit_tiny", img_size=8, patch_size=2, embed_dim=64, depth=4, num_heads=2, head_depth=2,
             norm_pix=False, order="prefix", data="digits", crop_scale=(0.8, 1.0), hflip=False, batch_size=128,
             blr=8e-3, betas=(0.9, 0.95), weight_decay=0.05, warmup_steps=20, steps=1500, log_every=100,
             probe=True, out="runs/aim_digits")),
    "aim_in1k_vitb": (
        "AIM (El-Nouby et al.) recipe on a ViT-B trunk (the paper's smallest model is 0.6B; ViT-B is this "
        "package's size): 224 px, P=14, raster order with a prefix drawn uniformly per image (1..N-1), "
        "norm-pix MSE on the non-prefix patches, a 12-block MLP head, AdamW betas (0.9, 0.95) wd 0.05, "
        "cosine schedule, global batch 4096; blr, warm-up and length are this package's choice (MAE-style), "
        "not the paper's",
        dict(model="aim_vit_base", img_size=224, patch_size=14, head_depth=12, norm_pix=True, order="prefix",
             data="imagenet", crop_scale=(0.4, 1.0), blr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95),
             batch_size=4096, warmup_epochs=40, epochs=800, out="runs/aim_in1k_vitb")),
}

# Each method's recipe: what a --model of that family brings when the preset in use was written for
# the other family (or for the digits demo, when no preset was chosen). Sizes (width, depth, heads,
# decoder / query depth) are then the model's own: a preset's sizes belong to the preset's model.
FAMILY_RECIPES: dict[str, dict] = {
    # RandSAC (Hua et al.): hierarchical squares, its decoder, norm-pix targets, MAE's augmentation
    "randsac": dict(order="square:16/4", blur_kernel=0, norm_pix=True, crop_scale=(0.2, 1.0), hflip=True),
    # SAIM (Qi et al.): one token per segment in random order, Gaussian-blurred norm-pix targets,
    # RandomResizedCrop scale (0.67, 1) + flip
    "saim": dict(order="random", blur_kernel=9, blur_sigma=1.0, norm_pix=True, crop_scale=(0.67, 1.0), hflip=True),
    # AIM (El-Nouby et al.): prefix-causal raster order, unblurred norm-pix targets, crop 0.4-1 + flip
    "aim": dict(order="prefix", blur_kernel=0, norm_pix=True, crop_scale=(0.4, 1.0), hflip=True),
}
# Model fields only the other family has.
_OTHER_FAMILY_FIELDS = {"randsac": ("query_depth", "share_weight", "head", "head_depth"),
                        "saim": ("decoder_depth", "decoder_num_heads", "skip_memory", "head_depth"),
                        "aim": ("decoder_depth", "decoder_num_heads", "skip_memory", "query_depth", "share_weight",
                                "head")}
#: Model-size fields: a preset's value applies only to the preset's own model.
SIZE_FIELDS = ("embed_dim", "depth", "num_heads", "decoder_depth", "decoder_num_heads", "query_depth",
               "share_weight", "head", "skip_memory", "head_depth")


# --------------------------------------------------------------------------------------------
# Flat field access and CLI parsing
# --------------------------------------------------------------------------------------------
_SECTIONS = ("model", "data", "optim", "train")


def _fields(cfg: Config):
    """Yield (section object, dataclass field) for every leaf field."""
    for name in _SECTIONS:
        sec = getattr(cfg, name)
        for f in dataclasses.fields(sec):
            yield sec, f


def _hints(section_cls) -> dict:
    return typing.get_type_hints(section_cls)


def _parser_for(tp):
    """Turn a type hint into a string parser that raises ValueError naming the bad value."""
    args = typing.get_args(tp)
    optional = type(None) in args
    if optional:
        tp = next(a for a in args if a is not type(None))
        args = typing.get_args(tp)
    origin = typing.get_origin(tp)

    def scalar(kind):
        def parse(text: str):
            if optional and text.lower() in ("none", "null"):
                return None
            if kind is bool:
                low = text.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(f"expected true or false, got {text!r}")
            try:
                return kind(text)
            except ValueError:
                raise ValueError(f"expected {kind.__name__}, got {text!r}") from None
        return parse

    if origin is tuple:
        item = scalar(args[0])
        length = None if (len(args) == 2 and args[1] is Ellipsis) else len(args)

        def parse_tuple(text: str):
            if optional and text.lower() in ("none", "null"):
                return None
            vals = tuple(item(t) for t in text.split(","))
            if length is not None and len(vals) != length:
                raise ValueError(f"expected {length} comma-separated values, got {text!r}")
            return vals
        return parse_tuple
    return scalar(tp)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


DEFAULT_PRESET = "digits"
#: The preset a --data of your own (a directory, shards) starts from when no preset is chosen.
OWN_DATA_PRESET = "folder"
# Data the default preset may run on without --preset: its own, and images made at any size.
_DEFAULT_PRESET_DATA = ("digits", "synthetic")


def _is_bool(hint) -> bool:
    return hint is bool or set(typing.get_args(hint)) == {bool, type(None)}


def _default_text(name: str, value, preset: str, file_values: dict, file_name: str | None) -> str:
    """Where a field's value comes from when no flag sets it: the --config file, the preset, or
    the field's own default -- the value the run will use, not the dataclass default."""
    if name in file_values:
        return f"default: from {file_name}: {file_values[name]}"
    if name in PRESETS[preset][1]:
        return f"default: from preset {preset}: {PRESETS[preset][1][name]}"
    return f"default: {value}"


def build_parser(preset: str = DEFAULT_PRESET, file_values: dict | None = None,
                 file_name: str | None = None) -> argparse.ArgumentParser:
    """The trainer's parser: one flag per field, each help line ending with the value the run
    will use given ``preset`` and the ``--config`` file's values."""
    presets = "\n".join(f"  {k}: {src}" for k, (src, _) in PRESETS.items())
    file_values = file_values or {}
    p = Parser(
        prog="python -m randsac_fast.train",
        usage="%(prog)s [--preset NAME] [--config FILE] [--FIELD VALUE | --FLAG | --no-FLAG ...]",
        description="RandSAC / SAIM pre-training (FSDP2; torchrun for several processes). Values come "
                    "from --preset, then the --config file, then the flags given. Booleans are --x / "
                    "--no-x; lists are comma-separated (--betas 0.9,0.95).",
        epilog="presets:\n" + presets, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"settings to start from (see below; default: {preset})")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a TOML or JSON config (e.g. the config.json a run wrote): reproduces that run; "
                        "flags given here override it")
    cfg = Config()
    for sec, f in _fields(cfg):
        hint = _hints(type(sec))[f.name]
        help_text = f"{f.metadata['doc']} ({_default_text(f.name, getattr(sec, f.name), preset, file_values, file_name)})"
        if _is_bool(hint):
            p.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_text)
        else:
            p.add_argument(_flag(f.name), dest=f.name, type=_as_argparse(_parser_for(hint), f.name),
                           default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)
    return p


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def legacy_booleans(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Rewrite the older spelling ``--x true|false`` (and ``--x=false``) of a boolean flag into
    ``--x`` / ``--no-x``, so scripts written for it keep working. Only for parsers without
    positional arguments, where a word after a boolean flag can only be its value."""
    flags = {s for a in parser._actions if isinstance(a, argparse.BooleanOptionalAction)
             for s in a.option_strings if not s.startswith("--no-")}
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in flags and (eq or (i + 1 < len(argv) and not argv[i + 1].startswith("-"))):
            if not eq:
                value, i = argv[i + 1], i + 1
            if value.lower() not in _TRUE + _FALSE:
                parser.error(f"{name}: expected true or false, got {value!r} (or write {name} / --no-{name[2:]})")
            arg = name if value.lower() in _TRUE else "--no-" + name[2:]
        out.append(arg)
        i += 1
    return out


def comma_list(kind=str):
    """An argparse ``type`` for the one list syntax of every command: comma-separated values
    (``--mean 0.5,0.5,0.5``). Used with ``nargs="+"`` and :func:`flat`, the older space-separated
    spelling (``--mean 0.5 0.5 0.5``) keeps working."""
    def parse(text: str):
        try:
            return [kind(t) for t in text.split(",") if t != ""]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    parse.__name__ = f"comma-separated {kind.__name__}"
    return parse


def flat(lists):
    """[[a, b], [c]] -> [a, b, c] (the value of a ``nargs="+"`` :func:`comma_list` flag); None stays None."""
    return None if lists is None else [x for part in lists for x in part]


def _as_argparse(parse, name):
    def wrapped(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')}: {e}") from None
    wrapped.__name__ = name
    return wrapped


def apply(cfg: Config, values: dict) -> Config:
    """Set leaf fields by name; unknown names raise ValueError."""
    known = {f.name: sec for sec, f in _fields(cfg)}
    for key, val in values.items():
        if key not in known:
            raise ValueError(f"unknown config field {key!r}; see --help for the fields")
        setattr(known[key], key, val)
    return cfg


# --------------------------------------------------------------------------------------------
# Config files: --config run.toml / config.json
# --------------------------------------------------------------------------------------------
def _file_value(value, hint, where: str):
    """A TOML / JSON value checked against the field's type hint (strings parse as on the CLI)."""
    if isinstance(value, str):
        try:
            return _parser_for(hint)(value)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{where}: a value is required, got null")
    base = next((a for a in args if a is not type(None)), hint) if type(None) in args else hint

    def scalar(v, kind):
        if kind is str and isinstance(v, int) and not isinstance(v, bool):
            v = str(v)          # e.g. workers = 4 for a field that also takes "auto"
        ok = (isinstance(v, bool) if kind is bool else
              isinstance(v, (int, float)) and not isinstance(v, bool) if kind is float else
              isinstance(v, int) and not isinstance(v, bool) if kind is int else isinstance(v, kind))
        if not ok:
            raise ValueError(f"{where}: expected {kind.__name__}, got {v!r}")
        return float(v) if kind is float else v

    if typing.get_origin(base) is tuple:
        items = typing.get_args(base)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        if not (len(items) == 2 and items[1] is Ellipsis) and len(value) != len(items):
            raise ValueError(f"{where}: expected {len(items)} values, got {list(value)!r}")
        return tuple(scalar(v, items[0]) for v in value)
    return scalar(value, base)


def load_config_file(path: str) -> tuple[dict, list[str], str | None]:
    """Read ``--config``: (field values, the fields that count as set by the user, preset or None).

    The file holds the sections of a run's ``config.json`` (``[model]``, ``[data]``, ``[optim]``,
    ``[train]``) or bare field names, and optionally ``preset``. A ``flags`` list (written by runs)
    names the fields the user set; without one, every field in the file counts as set.
    """
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file")
    try:
        if path.endswith(".toml"):
            with open(path, "rb") as fh:
                raw = _toml().load(fh)
        else:
            with open(path) as fh:
                raw = json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:   # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"--config {path}: not valid {'TOML' if path.endswith('.toml') else 'JSON'}: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path}: expected a table of fields, got {type(raw).__name__}")
    hints = {f.name: _hints(type(sec))[f.name] for sec, f in _fields(Config())}
    preset, flags, values = raw.pop("preset", None), raw.pop("flags", None), {}
    for key, val in raw.items():
        items = val.items() if key in _SECTIONS and isinstance(val, dict) else [(key, val)]
        for name, v in items:
            where = f"--config {path}: {key + '.' if key in _SECTIONS else ''}{name}"
            if name not in hints:
                raise ValueError(f"{where} is not a config field; see --help for the fields")
            values[name] = _file_value(v, hints[name], where)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"--config {path}: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return values, list(values) if flags is None else [f for f in flags if f in hints], preset


def _toml():
    try:
        import tomllib                      # Python >= 3.11
    except ModuleNotFoundError:
        try:
            import tomli as tomllib         # Python 3.10 (installed with the package)
        except ModuleNotFoundError:
            raise ValueError("TOML config files on Python 3.10 need tomli: pip install tomli") from None
    return tomllib


def _early(argv: list[str]):
    """--preset and --config, read before the parser is built (its help shows their values)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--preset", default=None)
    p.add_argument("--config", default=None)
    p.add_argument("--data", default=None)
    return p.parse_known_args(argv)[0]


def parse_args(argv=None) -> Config:
    """Preset, then the --config file, then flags. Unknown preset or flag, a bad value or a bad
    config file: argparse error (exit code 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    early = _early(argv)
    file_values, file_flags, file_preset = {}, [], None
    file_error = None
    if early.config:
        try:
            file_values, file_flags, file_preset = load_config_file(early.config)
        except ValueError as e:
            file_error = str(e)
    data = early.data or file_values.get("data")
    own_data = data is not None and data not in _DEFAULT_PRESET_DATA
    preset = early.preset or file_preset or (OWN_DATA_PRESET if own_data else DEFAULT_PRESET)
    parser = build_parser(preset if preset in PRESETS else DEFAULT_PRESET, file_values, early.config)
    ns = parser.parse_args(legacy_booleans(argv, parser))
    if file_error:
        parser.error(file_error)
    if preset not in PRESETS:
        parser.error(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = vars(ns)
    values.pop("preset")
    values.pop("config")
    cfg = apply(Config(preset=preset), dict(PRESETS[preset][1]))
    apply(cfg, file_values)
    apply(cfg, values)
    cfg.flags = sorted(set(file_flags) | set(values))
    given = set(values) | set(file_values)
    if not (early.preset or file_preset) and own_data:
        cfg.notes.append(f"--data {data} without --preset: starting from preset {OWN_DATA_PRESET} (your own images: "
                         f"{cfg.model.img_size}x{cfg.model.img_size}, patch {cfg.model.patch_size}, order "
                         f"{cfg.train.order}; see --help for its values); pass --preset NAME for another")
    _one_warmup(cfg, given)
    cfg.notes += follow_model(cfg, preset, given)
    return cfg


def _one_warmup(cfg: Config, given: set) -> None:
    """The warm-up field the user gives wins over the preset's (a preset's warmup_steps would
    otherwise silently shadow --warmup-epochs or --warmup-frac)."""
    o, mine = cfg.optim, {"warmup_steps", "warmup_frac", "warmup_epochs"} & given
    if mine and "warmup_steps" not in mine:
        o.warmup_steps = None
    if mine and "warmup_frac" not in mine:
        o.warmup_frac = None


def _family(model: str) -> str:
    return model.partition("_")[0]


def _named_size(model: str) -> tuple[int, int, int] | None:
    from .models.vit import SIZES
    return SIZES.get(model.partition("_vit_")[2])


def follow_model(cfg: Config, preset: str, given: set) -> list[str]:
    """Make the method's settings follow ``--model``; return the one-line notes saying what changed.

    A preset's model-size fields (:data:`SIZE_FIELDS`) belong to the preset's model: with another
    ``--model`` they fall back to that model's own. A preset written for the other family (the
    default digits demo is RandSAC) gives way to the chosen family's recipe (:data:`FAMILY_RECIPES`).
    Fields the user set (flags or ``--config``) are kept as given. A model whose width / depth /
    heads the flags set to another standard size is renamed to it (``saim_vit_base`` at width 192,
    depth 12, 3 heads is ``saim_vit_tiny``)."""
    notes = []
    m = cfg.model
    preset_values = PRESETS[preset][1]
    preset_model = preset_values.get("model")
    if preset_model and m.model != preset_model and "model" in given:
        sections = {f.name: sec for sec, f in _fields(cfg)}
        changed = []
        for name in SIZE_FIELDS:
            if name not in given and preset_values.get(name) is not None:
                changed.append((name, getattr(sections[name], name), None))
        family = _family(m.model)
        if family != _family(preset_model):
            for name, value in FAMILY_RECIPES.get(family, {}).items():
                now = getattr(sections[name], name)
                if name not in given and (tuple(now) if isinstance(now, list) else now) != value:
                    changed.append((name, now, value))
        for name, _, value in changed:
            setattr(sections[name], name, value)
        if changed:
            foreign = _OTHER_FAMILY_FIELDS.get(family, ())
            what = ", ".join(f"{name} {_shown(was)} -> {'the model default' if now is None else _shown(now)}"
                             for name, was, now in changed if name not in foreign)
            dropped = [name for name, _, _ in changed if name in foreign]
            if dropped:
                what += f"; dropped (not a {family} field): {', '.join(dropped)}"
            notes.append(f"--model {m.model}: preset {preset} was written for {preset_model}; using "
                         f"{family}'s settings instead: {what} (set a flag to choose otherwise)")
    named = _named_size(m.model)
    if named is not None and {"embed_dim", "depth", "num_heads"} & given:
        shape = (m.embed_dim or named[0], m.depth or named[1], m.num_heads or named[2])
        from .models.vit import SIZES
        match = next((size for size, dims in SIZES.items() if dims == shape), None)
        if shape != named and match is not None:
            renamed = f"{_family(m.model)}_vit_{match}"
            notes.append(f"--model {m.model} with width {shape[0]}, depth {shape[1]}, {shape[2]} heads is "
                         f"{renamed}; recorded as {renamed}")
            m.model = renamed
        elif shape != named:
            notes.append(f"--model {m.model} with width {shape[0]}, depth {shape[1]}, {shape[2]} heads: a custom "
                         f"size of the {_family(m.model)} family (not ViT-{m.model.partition('_vit_')[2]})")
    return notes


def to_dict(cfg: Config) -> dict:
    out = dataclasses.asdict(cfg)
    out.pop("notes", None)
    return out


#: How a run was started, not what it computes: left out of the config a run records, so that
#: ``--config RUN/config.json`` trains the same run from scratch (not a resume of it).
_HOW_STARTED = {"resume": None, "allow_changed": False, "force": False}


def reproducible(cfg: Config) -> dict:
    """The config a run records in ``config.json``: its settings without how it was started
    (``--resume``, ``--allow-changed``, ``--force``), so the file reproduces the run."""
    out = to_dict(cfg)
    out["train"].update(_HOW_STARTED)
    out["flags"] = [f for f in out["flags"] if f not in _HOW_STARTED]
    return out


def dumps(cfg: Config) -> str:
    return json.dumps(reproducible(cfg), indent=2)


# --------------------------------------------------------------------------------------------
# Validation: one declared rule per field (RULES), checked by validate() — every value a user
# can type is refused with one line naming the flag, the value and what it must be.
# --------------------------------------------------------------------------------------------
class Rule:
    """A constraint on one value: ``rule(value)`` -> None when it holds, else what it must be."""
    complete = False         # True: the message names the fix without the field's doc

    def __init__(self, test, must: str):
        self.test, self.must = test, must

    def __call__(self, value) -> str | None:
        try:
            return None if self.test(value) else self.must
        except (TypeError, ValueError):
            return self.must


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def at_least(n: int) -> Rule:
    return Rule(lambda x: _is_int(x) and x >= n, f"an integer >= {n}")


def integer() -> Rule:
    return Rule(_is_int, "an integer")


def seed_value() -> Rule:
    """A random seed every generator takes (torch's are 64-bit: larger ones overflow deep inside)."""
    return Rule(lambda x: _is_int(x) and 0 <= x < 2**63, "an integer from 0 to 2**63 - 1 (9223372036854775807)")


def positive() -> Rule:
    return Rule(lambda x: _is_real(x) and x > 0, "a finite number > 0")


def non_negative() -> Rule:
    return Rule(lambda x: _is_real(x) and x >= 0, "a finite number >= 0")


def boolean() -> Rule:
    return Rule(lambda x: isinstance(x, bool), "true or false")


def text() -> Rule:
    return Rule(lambda x: isinstance(x, str) and x != "", "a non-empty string")


def one_of(*choices: str) -> Rule:
    return Rule(lambda x: x in choices, f"one of {', '.join(choices)}")


def optional(rule: Rule) -> Rule:
    return Rule(lambda x: x is None or rule(x) is None, f"{rule.must}, or none")


def each(rule: Rule, length: int | None = None) -> Rule:
    count = f"{length} comma-separated values, each" if length else "comma-separated values, each"
    return Rule(lambda x: isinstance(x, (tuple, list)) and len(x) >= 1 and (length is None or len(x) == length)
                and all(rule(v) is None for v in x), f"{count} {rule.must}")


def interval(low: float, high: float) -> Rule:
    """A pair (a, b) with low < a <= b <= high."""
    top = "" if math.isinf(high) else f" <= {high:g}"
    return Rule(lambda x: isinstance(x, (tuple, list)) and len(x) == 2 and all(_is_real(v) for v in x)
                and low < x[0] <= x[1] and x[1] <= high, f"two values a,b with {low:g} < a <= b{top}")


def odd_or_zero() -> Rule:
    return Rule(lambda x: _is_int(x) and (x in (0, 1) or (x >= 3 and x % 2 == 1)), "0 (off) or an odd size >= 3")


def fraction() -> Rule:
    return Rule(lambda x: _is_real(x) and 0 <= x < 1, "a number in [0, 1)")


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _writable_dir(path) -> str | None:
    if not isinstance(path, str) or not path:
        return "a directory path"
    if os.path.exists(path) and not os.path.isdir(path):
        return "a directory, but it is a file — pass a directory (it is created if missing)"
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        return f"a directory, but {base} is a file — pass a path under a directory"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"a writable directory, but {base} is read-only — pass a directory you can write to"
    return None


def writable_dir() -> Rule:
    """A directory (existing or to be created) that can be written; checked without writing."""
    return _PathRule(_writable_dir)


def _writable_file(path, create_parent: bool) -> str | None:
    if not isinstance(path, str) or not path:
        return "a file path"
    if os.path.isdir(path):
        return "a file, but it is a directory — pass a file name"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) and not create_parent:
        return f"a file in an existing directory, but {parent} does not exist — create it first"
    base = _nearest_existing(parent)
    if not os.path.isdir(base):
        return f"a file under a directory, but {base} is a file — pass another path"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"a writable file, but {base} is read-only — pass a path you can write to"
    return None


class _PathRule(Rule):
    """A rule whose message names what is wrong with the path (file, read-only ancestor ...)."""
    complete = True          # the message says the fix itself: no field doc appended

    def __init__(self, check):
        self.check, self.must = check, "a path"

    def __call__(self, value) -> str | None:
        return self.check(value)


def writable_file(create_parent: bool = False) -> Rule:
    """An output file whose directory exists (or, with ``create_parent``, can be created) and can
    be written; checked without writing."""
    return _PathRule(lambda path: _writable_file(path, create_parent))


def _device(x) -> bool:
    return x in ("auto", "cpu", "cuda")


#: The constraint of every field (tests assert that each field has one).
RULES: dict[str, Rule] = {
    # model
    "model": text(), "img_size": at_least(1), "patch_size": at_least(1),
    "embed_dim": optional(at_least(1)), "depth": optional(at_least(1)), "num_heads": optional(at_least(1)),
    "decoder_depth": optional(at_least(1)), "decoder_num_heads": optional(at_least(1)),
    "query_depth": optional(at_least(1)), "share_weight": optional(boolean()),
    "head": optional(one_of("mlp", "linear")), "skip_memory": optional(boolean()), "head_depth": optional(at_least(0)),
    "blur_kernel": optional(odd_or_zero()), "blur_sigma": optional(positive()), "norm_pix": optional(boolean()),
    "loss": optional(one_of("mse", "l1")),
    "backend": one_of("auto", "reference", "sdpa", "sdpa_causal", "flex", "xformers", "triton", "cuda"),
    # data
    "data": text(), "crop_scale": interval(0.0, 1.0), "crop_ratio": interval(0.0, math.inf), "hflip": boolean(),
    "mean": optional(each(Rule(_is_real, "a finite number"))), "std": optional(each(positive())),
    "workers": Rule(lambda x: str(x).strip().lower() == "auto" or str(x).strip().isdigit(),
                    "auto or a whole number >= 0"), "synthetic_size": at_least(1), "knn_data": optional(text()),
    # optim
    "blr": positive(), "min_lr": non_negative(), "weight_decay": non_negative(), "betas": each(fraction(), 2),
    "warmup_steps": optional(at_least(0)), "warmup_epochs": non_negative(),
    "warmup_frac": optional(fraction()), "clip_grad": optional(positive()),
    # train
    "out": writable_dir(), "steps": optional(at_least(1)), "epochs": positive(), "batch_size": at_least(1),
    "accum": optional(at_least(1)), "micro_batch": optional(at_least(1)), "seed": seed_value(), "order": text(), "resume": optional(text()),
    "ckpt_every": at_least(0), "keep": at_least(1), "log_every": at_least(1),
    "compile": one_of("none", "block", "whole", "whole-cudagraphs"),
    "fsdp_units": one_of("auto", "block", "root"),
    "ac": boolean(), "master_weights": boolean(), "probe": boolean(), "knn_every": at_least(0), "knn_k": at_least(1),
    "knn_images": optional(at_least(1)), "device": Rule(_device, "auto, cpu or cuda"), "threads": optional(at_least(1)),
    "wandb": boolean(), "wandb_project": text(), "allow_changed": boolean(), "force": boolean(),
}


def _shown(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return repr(value) if value == "" or not isinstance(value, (str, int, float)) else str(value)


def check_value(name: str, value, rule: Rule, doc_text: str = "") -> None:
    """Raise ValueError('--flag VALUE: must be ... (doc)') when ``value`` breaks ``rule``."""
    must = rule(value)
    if must is not None:
        about = f" ({doc_text})" if doc_text and not rule.complete else ""
        raise ValueError(f"{_flag(name)} {_shown(value)}: must be {must}{about}")


def validate(cfg: Config) -> Config:
    """Check every field against its rule (and the few rules between fields); the first broken
    one raises ValueError with one line naming the flag, the value and the fix."""
    for sec, f in _fields(cfg):
        check_value(f.name, getattr(sec, f.name), RULES[f.name], f.metadata.get("doc", ""))
    d = cfg.data
    if d.mean is not None and d.std is not None and len(d.mean) != len(d.std):
        raise ValueError(f"--mean {_shown(d.mean)} and --std {_shown(d.std)}: give one value per channel to both")
    return cfg


def check_channels(cfg: Config, channels: int) -> None:
    """--mean / --std must give one value per channel of the data."""
    for name in ("mean", "std"):
        value = getattr(cfg.data, name)
        if value is not None and len(value) != channels:
            raise ValueError(f"--{name} {_shown(value)}: the data has {channels} channel(s); give {channels} "
                             f"comma-separated value(s) (or none: the data set's own)")


def check_args(args: argparse.Namespace, rules: dict[str, Rule]) -> None:
    """The same checks for another command's parsed flags (``rules``: dest name -> rule)."""
    for name, rule in rules.items():
        check_value(name, getattr(args, name), rule)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage of ~50 flags would bury it); exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
