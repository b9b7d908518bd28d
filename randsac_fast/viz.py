"""Figures (PNG, matplotlib): sampled segment orders, and reconstructions of a trained model.

``python -m randsac_fast.viz orders --spec blob:11/5 --grid 8 [--n 4] [--seed 0] --out orders.png``
    Sampled orders as in the RandSAC paper's Figures 2 and 3. Each cell is a token; each segment is
    one colour and carries its position in the order (1 = first). With a hierarchy, the hue is the
    partition and the shade goes from light to dark along the order inside it; partitions are
    outlined in black (thicker for coarser levels), segments in white.

``python -m randsac_fast.viz recon --ckpt CKPT --images digits [--n 4] [--order SPEC] --out recon.png``
    One row per image: image | order | prediction. With norm-pix targets the prediction is
    un-normalised with each patch's mean and std from the target; without, it is already in
    pixel space (the title says which; for SAIM it is the blurred image the model was trained to
    predict). Tokens the model does not predict (RandSAC's first segment, the given context) show
    the real input patches, outlined. ``--images DIR`` takes its examples across the classes
    (ImageFolder subfolders, CIFAR / digits labels) in turn, not the first files.

matplotlib is needed (pip install matplotlib); figures are drawn with the Agg backend (headless).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch import Tensor

from . import orders as orders_mod
from . import reference
from .config import comma_list, flat
from .runtime.summary import print_summary, run_command

__all__ = ["plot_orders", "plot_recon", "draw_order", "unnormalize_prediction", "load_images", "across_classes",
           "main"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("figures need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")                # headless: files only, no display
    import matplotlib.pyplot as plt
    return plt


# --------------------------------------------------------------------------------------------
# Drawing one order
# --------------------------------------------------------------------------------------------
def _segment_colours(levels: orders_mod.OrderLevels, b: int) -> np.ndarray:
    """[S, 3] RGB per segment rank of sample b: one hue per top-level partition (or one colour
    map along the order without a hierarchy), shade light -> dark along the order."""
    from matplotlib import colormaps
    seg = levels.ranks[0][b].numpy()                       # segment rank per serial position
    s = int(seg[-1]) + 1
    if len(levels.ranks) == 1:
        return colormaps["viridis"](np.linspace(0.95, 0.05, s) if s > 1 else [0.5])[:, :3]
    part = levels.ranks[-1][b].numpy()
    palette = colormaps["tab10"].colors
    out = np.zeros((s, 3))
    for p in np.unique(part):
        ranks = np.unique(seg[part == p])                  # contiguous: a partition is visited at once
        for i, r in enumerate(ranks):
            t = i / (len(ranks) - 1) if len(ranks) > 1 else 1.0   # 0 first, 1 last in the partition
            white = 0.7 * (1.0 - t)                        # first: mostly white, last: the pure hue
            out[r] = np.asarray(palette[p % len(palette)]) * (1.0 - white) + white
    return out


def _borders(labels: np.ndarray) -> list[list[tuple[float, float]]]:
    """Cell edges between different labels of a [gh, gw] grid, as line segments in pixel coords."""
    lines = []
    for i, j in zip(*np.nonzero(labels[:, 1:] != labels[:, :-1])):       # vertical edges
        lines.append([(j + 0.5, i - 0.5), (j + 0.5, i + 0.5)])
    for i, j in zip(*np.nonzero(labels[1:, :] != labels[:-1, :])):       # horizontal edges
        lines.append([(j - 0.5, i + 0.5), (j + 0.5, i + 0.5)])
    return lines


def draw_order(ax, levels: orders_mod.OrderLevels, b: int, grid, *, numbers: bool = True) -> None:
    """Draw sample b of ``levels`` (from :func:`orders.sample_levels`) on a matplotlib axis."""
    from matplotlib.collections import LineCollection
    gh, gw = orders_mod.grid_shape(grid)
    rank = levels.raster_ranks(0)[b].numpy().reshape(gh, gw)
    colours = _segment_colours(levels, b)
    ax.imshow(colours[rank], interpolation="nearest")
    ax.add_collection(LineCollection(_borders(rank), colors="white", linewidths=0.8))
    for level in range(1, len(levels.ranks)):
        part = levels.raster_ranks(level)[b].numpy().reshape(gh, gw)
        ax.add_collection(LineCollection(_borders(part), colors="black", linewidths=1.2 + 1.2 * level))
    if numbers:
        size = max(4.0, min(11.0, 90.0 / max(gh, gw)))
        for r in range(int(rank.max()) + 1):
            ys, xs = np.nonzero(rank == r)
            x, y = xs.mean(), ys.mean()
            if not np.any((np.abs(xs - x) <= 0.5) & (np.abs(ys - y) <= 0.5)):
                # the centroid lies outside the segment (blobs need not be convex): nearest cell
                k = np.argmin((ys - y) ** 2 + (xs - x) ** 2)
                x, y = xs[k], ys[k]
            light = colours[r] @ np.array([0.299, 0.587, 0.114]) > 0.5
            ax.text(x, y, str(r + 1), ha="center", va="center", fontsize=size,
                    color="black" if light else "white")
    ax.set_xlim(-0.5, gw - 0.5)
    ax.set_ylim(gh - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_orders(spec: str, grid, out: str, *, n: int = 4, seed: int = 0, cols: int = 4) -> str:
    """Sample ``n`` orders of ``spec`` on ``grid`` and write them as one PNG; returns ``out``."""
    plt = _pyplot()
    gh, gw = orders_mod.grid_shape(grid)
    levels = orders_mod.sample_levels(spec, n, (gh, gw), generator=torch.Generator().manual_seed(seed))
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(2.7 * cols, 6.0), 2.9 * rows + 0.5), squeeze=False)
    for b, ax in enumerate(axes.flat):
        if b >= n:
            ax.axis("off")
            continue
        draw_order(ax, levels, b, (gh, gw))
        parts = "" if len(levels.ranks) == 1 else " in " + " / ".join(
            str(int(r[b, -1]) + 1) for r in levels.ranks[1:]) + " partitions"
        ax.set_title(f"{int(levels.ranks[0][b, -1]) + 1} segments{parts}", fontsize=9)
    hint = "number = position in the order, " + ("hue = partition, shade light->dark along it"
                                                 if len(levels.ranks) > 1 else "shade light->dark along it")
    fig.suptitle(f"{orders_mod.parse_spec(spec)} on a {gh}x{gw} token grid\n{hint}", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out: str) -> str:
    plt = _pyplot()
    from .outputs import atomic_write
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    try:   # a temporary name (same suffix: it picks the format), fsync, rename; recorded as viz's
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110), "viz")
    finally:
        plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------
# Reconstructions
# --------------------------------------------------------------------------------------------
def unnormalize_prediction(pred: Tensor, images: Tensor, patch_size: int, *, blur_kernel: int = 0,
                           blur_sigma: float = 1.0, norm_pix: bool = True) -> Tensor:
    """Predicted (normalised) patches -> pixel patches, with each patch's statistics from the target.

    pred: [B, N, P*P*C] raster order; images: [B, C, H, W] (the model's input). The target is the
    (blurred) image patch; with norm-pix it was (t - mean) / sqrt(var + eps) per patch (see
    :func:`reference.normalize_patches`), so this returns pred * sqrt(var + eps) + mean.
    """
    target = reference.patchify(reference.gaussian_blur(images, blur_kernel, blur_sigma)
                                if blur_kernel > 1 else images, patch_size)
    if not norm_pix:
        return pred
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=True)
    return pred * torch.sqrt(var + reference.NORM_PIX_EPS) + mean


class _Files:
    """Image files as a source (the interface of randsac_fast.data sources)."""

    def __init__(self, paths: list[str], channels: int):
        from .data import IMAGENET_MEAN, IMAGENET_STD
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"image file(s) not found: {', '.join(missing)}; pass image files, a directory, "
                                    "'digits' or 'synthetic'")
        self.paths, self.channels = paths, channels
        grey = ((0.5,) * channels, (0.25,) * channels)
        self.mean, self.std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else grey

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Tensor:
        from PIL import Image

        from .data import decode_rgb
        with Image.open(self.paths[i]) as img:
            rgb = decode_rgb(img)                   # 16-bit images scaled by their depth
        if self.channels == 3:
            return rgb
        luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)   # Pillow's "L" weights (ITU-R 601-2)
        return (rgb * luma).sum(dim=0, keepdim=True)

    def label(self, i: int) -> int:
        return 0


def across_classes(labels, n: int) -> list[int]:
    """Indices of ``n`` examples taken from the classes in turn (the first example of each class,
    then the second, ...), in class order; ``labels`` [N] holds each example's class."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    picked, depth = [], 0
    while len(picked) < n and any(depth < len(q) for q in queues):
        picked += [q[depth] for q in queues if depth < len(q)][: n - len(picked)]
        depth += 1
    return picked


def load_images(images: list[str], img_size: int, channels: int, n: int, mean=None, std=None, *,
                with_labels: bool = False):
    """``digits`` | ``synthetic`` | a directory | image files -> (normalised [n, C, S, S], mean, std)
    (+ labels with ``with_labels``: a folder's class names, else class numbers [n]). Examples of a labelled source (a directory's class
    subfolders, CIFAR, digits) are taken across its classes (:func:`across_classes`). mean/std
    default to the source's own statistics."""
    from . import data
    if len(images) == 1 and (images[0] in ("digits", "synthetic") or os.path.isdir(images[0])):
        source = data.digits("test") if images[0] == "digits" else data.open_source(images[0], img_size, n)
        indices = across_classes([source.label(i) for i in range(len(source))], n)
    else:
        source = _Files(images, channels)
        indices = range(min(n, len(source)))
    if source.channels != channels:
        raise ValueError(f"the images have {source.channels} channel(s) but the model takes {channels}; "
                         "pass images of the kind it was trained on")
    mean, std = tuple(mean or source.mean), tuple(std or source.std)
    for flag, stat in (("--mean", mean), ("--std", std)):
        if len(stat) != channels:
            raise ValueError(f"{flag} {','.join(map(str, stat))}: the model takes {channels} channel(s); give one "
                             "value per channel")
    x, labels = data.eval_images(source, img_size, mean, std, indices=indices)
    if isinstance(source, (_Files, data.SyntheticSource)):
        labels = None                                  # files and synthetic images have no classes
    elif getattr(source, "classes", None):             # a folder: its class folder names
        labels = [source.classes[int(y)] for y in labels]
    return (x, mean, std, labels) if with_labels else (x, mean, std)


def _cells_to_pixels(lines, patch_size: int):
    """Line segments in token-cell coordinates (:func:`_borders`) -> image pixel coordinates."""
    return [[((x + 0.5) * patch_size - 0.5, (y + 0.5) * patch_size - 0.5) for x, y in line] for line in lines]


def plot_recon(model, images: Tensor, out: str, *, spec: str, mean, std, seed: int = 0, labels=None) -> str:
    """image | order | prediction for each image (normalised [B, C, H, W] in the model's input
    space); ``spec`` is the order to predict in; ``labels`` [B] (optional: class numbers, or a
    folder's class names) titles each row with its class. Tokens the model is given rather than asked for show the input patches, outlined in
    the prediction. Returns ``out``."""
    from matplotlib.collections import LineCollection
    plt = _pyplot()
    c = model.config
    grid = model.grid
    orders_mod.check_fits(spec, grid)
    levels = orders_mod.sample_levels(spec, images.shape[0], grid, generator=torch.Generator().manual_seed(seed))
    model.eval()
    pred, valid = model.predict(images, levels.order)
    pixels = unnormalize_prediction(pred.float(), images.float(), c.patch_size, blur_kernel=c.blur_kernel,
                                    blur_sigma=c.blur_sigma, norm_pix=c.norm_pix)
    given = reference.patchify(images.float(), c.patch_size)
    patches = torch.where(valid[..., None], pixels, given)             # context tokens: the real patches
    recon = reference.unpatchify(patches, c.patch_size, grid, images.shape[1])

    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    show = lambda x: (x * s + m).clamp(0, 1)                         # noqa: E731  back to [0, 1] pixels
    shown, recon = show(images.float()), show(recon)
    context = (~valid).reshape(-1, *grid).numpy()                     # [B, gh, gw] given, not predicted

    b = images.shape[0]
    fig, axes = plt.subplots(b, 3, figsize=(7.5, 2.5 * b + 0.7), squeeze=False)
    for i in range(b):
        for ax, pic in ((axes[i, 0], shown[i]), (axes[i, 2], recon[i])):
            arr = pic.permute(1, 2, 0).numpy()
            ax.imshow(arr[..., 0] if arr.shape[-1] == 1 else arr, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        if context[i].any():
            edges = _borders(np.pad(context[i], 1).astype(np.int8))   # pad: the image edge is a border too
            edges = [[(x - 1, y - 1) for x, y in line] for line in edges]
            axes[i, 2].add_collection(LineCollection(_cells_to_pixels(edges, c.patch_size), colors="#ff7f0e",
                                                     linewidths=1.5))
        if labels is not None:
            name = labels[i]
            axes[i, 0].set_ylabel(name if isinstance(name, str) else f"class {int(name)}", fontsize=8)
        draw_order(axes[i, 1], levels, i, grid)
    notes = (["blurred"] if c.blur_kernel > 1 else []) + (["outlined: given"] if context.any() else [])
    for ax, title in zip(axes[0], ("image", f"order ({orders_mod.parse_spec(spec)})",
                                   "prediction" + (f" ({', '.join(notes)})" if notes else ""))):
        ax.set_title(title, fontsize=9)
    how = ("norm-pix targets, prediction un-normalised with each patch's target mean/std" if c.norm_pix
           else "pixel targets (no norm-pix), prediction shown as predicted")
    fig.suptitle(f"{type(model).__name__}: {how}", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def _default_order(model, meta: dict) -> str:
    spec = meta.get("config", {}).get("train", {}).get("order")
    if spec:
        return spec
    from .models import SAIM
    return "random" if isinstance(model, SAIM) else "square:16/4"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    from . import started
    started()                # Ctrl-C is this command's to handle from here
    from . import config as config_mod
    from .interop import add_checkpoint_args, load_model, parse_sets
    p = config_mod.Parser(prog="python -m randsac_fast.viz", description="Figures: orders, reconstructions.")
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("orders", help="sampled segment orders (RandSAC Figures 2 and 3)")
    o.add_argument("--spec", required=True, help="order spec, e.g. blob:11/5, square:16/4, random")
    o.add_argument("--grid", type=comma_list(int), nargs="+", required=True, help="token grid side (or H,W)")
    o.add_argument("--n", type=int, default=4, help="number of sampled orders (default 4)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--out", required=True, help="output PNG")
    o.add_argument("--force", action="store_true", help="replace an --out file another command (or you) wrote")
    r = sub.add_parser("recon", help="image | order | prediction of a trained model")
    add_checkpoint_args(r)
    r.add_argument("--images", type=comma_list(str), nargs="+", required=True,
                   help="digits | synthetic | a directory (ImageFolder / CIFAR) | image files (comma-separated)")
    r.add_argument("--n", type=int, default=4, help="number of images (default 4)")
    r.add_argument("--order", default=None, help="order spec (default: the training run's, else random / square:16/4)")
    r.add_argument("--mean", type=comma_list(float), nargs="+", default=None,
                   help="normalisation mean, one value per channel: comma-separated (0.5,0.5,0.5; spaces also "
                        "work) (default: the run's, else the data's)")
    r.add_argument("--std", type=comma_list(float), nargs="+", default=None,
                   help="normalisation std, one value per channel: comma-separated (0.25,0.25,0.25; spaces also "
                        "work) (default: the run's, else the data's)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", required=True, help="output PNG")
    r.add_argument("--force", action="store_true", help="replace an --out file another command (or you) wrote")
    args = p.parse_args(argv)
    for name in ("grid", "images", "mean", "std"):
        if hasattr(args, name):
            setattr(args, name, flat(getattr(args, name)))
    rules = {"n": config_mod.at_least(1), "seed": config_mod.seed_value(), "out": config_mod.writable_file(True)}
    if args.command == "orders":
        rules["grid"] = config_mod.each(config_mod.at_least(1))
    else:
        rules.update(mean=config_mod.RULES["mean"], std=config_mod.RULES["std"])

    def draw(_):
        from .outputs import claim_file
        config_mod.check_args(args, rules)
        claim_file(args.out, "viz", force=args.force)   # never over a file viz did not write
        if args.command == "orders":
            grid = args.grid[0] if len(args.grid) == 1 else tuple(args.grid)
            out = plot_orders(args.spec, grid, args.out, n=args.n, seed=args.seed)
        else:
            model, meta = load_model(args.ckpt, args.model, backend=args.backend, **parse_sets(args.set))
            run = meta.get("config", {}).get("data", {})
            images, mean, std, labels = load_images(args.images, model.img_size[0], model.in_chans, args.n,
                                                    args.mean or run.get("mean"), args.std or run.get("std"),
                                                    with_labels=True)
            out = plot_recon(model, images, args.out, spec=args.order or _default_order(model, meta),
                             mean=mean, std=std, seed=args.seed, labels=labels)
        print_summary(f"figure done ({args.command})", {"checkpoint": getattr(args, "ckpt", None), "figure": out})
    return run_command(draw, errors=(ValueError, TypeError, OSError, ImportError))


if __name__ == "__main__":
    sys.exit(main())
