"""The papers' order ablation as one command: pre-train one encoder per (order spec, seed), probe each.

``python -m randsac_fast.ablate [--specs raster,random,square:4,...] [--seeds 0,1,2] [--data digits]
[--out DIR] [training flags...]`` — the small-scale analogue of RandSAC's Table 1 (raster vs random
vs square vs blob segments, hierarchical orders, incoherent segments) and SAIM's order study.

``python -m randsac_fast.ablate --presets digits,saim_digits,aim_digits`` compares methods instead:
one cell per (preset, seed), each preset with its own model and order (RandSAC, SAIM, AIM at equal
steps on digits); ``--specs`` then applies the listed orders to every preset.

Every cell is an ordinary training run (``randsac_fast.train``'s trainer, one process, the preset
given by ``--preset``, default digits, plus any training flags) in ``DIR/cells/<spec>_seed<k>``,
followed by two evaluations of the frozen encoder on the labelled splits of ``--data``:

* ``probe``: the linear probe of :mod:`randsac_fast.eval.probe` (logistic regression on the
  avg-pooled final features, as the trainer's end-of-run probe);
* ``knn``: the k-NN monitor of :mod:`randsac_fast.eval.knn` (weighted 20-NN, cosine);
* ``attn``: the attentive probe of :mod:`randsac_fast.eval.attnprobe` (AIM's attention-pooling head
  on the frozen patch tokens, trained in memory).

A finished cell (its ``result.json``) is never rerun, and an interrupted one resumes from its last
checkpoint, so the command is resumable. Outputs in ``DIR``: ``ablation.json`` (every cell and a
summary per spec), ``ablation.md`` (a table), ``ablation.png`` (bars: mean over seeds, error bars:
standard deviation, dots: the seeds). The summary says whether the two evaluations rank the specs
alike (Spearman's rank correlation of the spec means) and agree on the best spec.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from . import config as config_mod
from . import orders
from .runtime.lock import lock_run_dir, release_all
from .outputs import atomic_text, atomic_write
from .runtime.summary import run_command

__all__ = ["main", "run", "DEFAULT_SPECS", "summarise"]

#: The papers' comparison, as it fits a 4x4 token grid (digits: 8x8 images, 2x2 patches): raster and
#: random token orders, square and blob segments, hierarchies (tokens in random order within 2x2
#: partitions; 8 blobs grouped into 4) and incoherent segments (random token sets of the squares' size).
DEFAULT_SPECS = ("raster", "random", "square:4", "blob:4", "square:16/4", "blob:8/4", "incoherent:4")


def _cell_name(label: str, seed: int) -> str:
    return f"{label.replace(':', '-').replace('/', '_')}_seed{seed}"

#: The evaluations of a cell, in the tables' order: result key -> what it is.
METRICS = {"probe": "linear probe", "knn": "k-NN (k=20)", "attn": "attentive probe"}


def _parse_list(text: str, kind=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"expected a comma-separated list, got {text!r}")
    return [kind(t) for t in items]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m randsac_fast.ablate",
        description="Order ablation: pre-train one encoder per (order spec, seed), then linear-probe and "
                    "k-NN it. Unknown flags are training flags (see python -m randsac_fast.train --help).")
    p.add_argument("--specs", default=None,
                   help=f"comma-separated order specs (default {','.join(DEFAULT_SPECS)}); specs that do not "
                        "fit the model's token grid are reported and skipped")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--out", default="runs/ablation", help="output directory (default runs/ablation)")
    p.add_argument("--preset", default="digits", help="training preset of every cell (default digits)")
    p.add_argument("--presets", default=None,
                   help="comma-separated presets to compare (e.g. digits,saim_digits,aim_digits): one cell per "
                        "(preset, seed), each with the preset's own order unless --specs is given")
    p.add_argument("--eval-images", type=int, default=10000,
                   help="at most this many images of each labelled split for probe and k-NN (default 10000)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument("--force", action="store_true", help="write into an --out that holds another command's files")
    return p


def _labelled_tensors(data: str, img_size: int, mean, std, limit: int, seed: int):
    """((train images, labels), (val images, labels)): whole un-augmented splits (as the trainer's
    probe reads them), or a fixed random subset of ``limit`` images of a larger split."""
    from . import data as data_mod
    from .eval.linprobe import labelled_splits
    out = []
    for source in labelled_splits(data):
        pick = (torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
                if len(source) > limit else None)
        out.append(data_mod.eval_images(source, img_size, mean, std, pick))
    return tuple(out)


def _chunks(images, labels, size: int = 256) -> list[tuple]:
    """In-memory (images, labels) as the batches a k-NN loader yields."""
    return [(images[i:i + size], labels[i:i + size]) for i in range(0, labels.numel(), size)]


def _train_cell(cfg: config_mod.Config, eval_images: int) -> dict:
    """Pre-train one cell (resuming if it was interrupted), evaluate it; -> the cell's result."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from . import models
    from .eval.attnprobe import attentive_probe_accuracy
    from .eval.knn import knn_accuracy
    from .eval.probe import linear_probe_accuracy
    from .train.trainer import Trainer

    start = time.perf_counter()
    try:
        trainer = Trainer(cfg)
        trainer.train()
        state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True,
                                                                             cpu_offload=True))
        steps, norm = trainer.step, trainer.norm
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    train_s = time.perf_counter() - start
    m, t = cfg.model, cfg.train
    encoder = models.build_from_config(m, trainer.source.channels, cfg.flags)
    encoder.load_state_dict(state)
    train, val = _labelled_tensors(cfg.data.data, m.img_size, *norm, eval_images, t.seed)
    probe = linear_probe_accuracy(encoder, train, val)
    knn = knn_accuracy(encoder, _chunks(*train), _chunks(*val), k=t.knn_k)
    attn = attentive_probe_accuracy(encoder, train, val, seed=t.seed)
    return {"spec": t.order, "preset": cfg.preset, "seed": t.seed, "probe": probe, "knn": knn, "attn": attn,
            "steps": steps,
            "train_s": round(train_s, 2), "eval_s": round(time.perf_counter() - start - train_s, 2),
            "knn_k": t.knn_k, "in_chans": trainer.source.channels, "config": config_mod.to_dict(cfg)}


def _check_cell(result: dict, cfg: config_mod.Config, path: str) -> None:
    """A finished cell is reused only if it was trained with this run's settings (model and
    training fields; output paths, cadences and speed switches may differ)."""
    from .runtime.resume_config import compare
    if "config" not in result:
        raise ValueError(f"{path} does not record the settings it was trained with, so it cannot be reused "
                         "safely; delete it (or its cell directory) to train the cell again")
    shape, training = compare(result["config"], config_mod.to_dict(cfg), result["in_chans"])
    changes = [(k, was, now) for k, was, now in shape + training if k not in ("order", "seed")]
    if changes:
        listing = ", ".join(f"{k} {was!r} -> {now!r}" for k, was, now in changes)
        raise ValueError(f"{path} was trained with other settings ({listing}); use another --out for "
                         "these settings, or delete the cell directory to train it again")


def _spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 items."""
    if len(a) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else None


def _stats(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "seeds": values}


def _label(cell: dict) -> str:
    return cell.get("label", cell["spec"])


def metrics_of(cells: list[dict]) -> list[str]:
    """The evaluations every cell has (cells written before the attentive probe have none)."""
    return [m for m in METRICS if cells and all(m in c for c in cells)]


def summarise(cells: list[dict], specs: list[str]) -> dict:
    """Per cell label (an order spec, or a preset): mean / std / per-seed of every evaluation; and
    whether the linear probe and k-NN agree."""
    per_spec, metrics = {}, metrics_of(cells)
    for spec in specs:
        mine = sorted((c for c in cells if _label(c) == spec), key=lambda c: c["seed"])
        if mine:
            per_spec[spec] = {**{m: _stats([c[m] for c in mine]) for m in metrics},
                              "seeds": [c["seed"] for c in mine]}
    names = list(per_spec)
    probe = [per_spec[s]["probe"]["mean"] for s in names]
    knn = [per_spec[s]["knn"]["mean"] for s in names]
    best_probe = names[probe.index(max(probe))] if names else None
    best_knn = names[knn.index(max(knn))] if names else None
    return {"specs": per_spec, "metrics": metrics, "rank_correlation": _spearman(probe, knn),
            "best_by_probe": best_probe, "best_by_knn": best_knn, "same_best": best_probe == best_knn}


def table(summary: dict) -> str:
    """A markdown table: one row per spec, mean ± std over seeds, and the per-seed values."""
    metrics = summary.get("metrics", ["probe", "knn"])
    rows = ["| cell | " + " | ".join(f"{METRICS[m]}, mean ± std | per seed" for m in metrics) + " |",
            "|---|" + "---|---|" * len(metrics)]
    for spec, s in summary["specs"].items():
        rows.append(f"| `{spec}` | " + " | ".join(
            f"{s[m]['mean']:.4f} ± {s[m]['std']:.4f} | {', '.join(f'{v:.3f}' for v in s[m]['seeds'])}"
            for m in metrics) + " |")
    rc = summary["rank_correlation"]
    rows.append("")
    rows.append(f"Best spec by linear probe: `{summary['best_by_probe']}`; by k-NN: `{summary['best_by_knn']}`; "
                f"Spearman rank correlation of the spec means: {'n/a' if rc is None else f'{rc:.2f}'}.")
    return "\n".join(rows) + "\n"


def plot(summary: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(summary["specs"])
    metrics = summary.get("metrics", ["probe", "knn"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(6, 1.4 * len(specs)) * 0.8 * len(metrics), 3.8),
                             sharey=False, squeeze=False)
    for ax, key in zip(axes[0], metrics):
        label = f"{METRICS[key]} accuracy"
        means = [summary["specs"][s][key]["mean"] for s in specs]
        stds = [summary["specs"][s][key]["std"] for s in specs]
        xs = range(len(specs))
        ax.bar(xs, means, yerr=stds, capsize=4, color="#8fb3d9", edgecolor="#2b5d8a")
        for x, s in zip(xs, specs):
            vals = summary["specs"][s][key]["seeds"]
            ax.scatter([x + (i - (len(vals) - 1) / 2) * 0.12 for i in range(len(vals))], vals, s=14,
                       color="#1a1a1a", zorder=3)
        lo = min(min(summary["specs"][s][key]["seeds"]) for s in specs)
        ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        ax.set_xticks(list(xs), specs, rotation=20)
        ax.set_ylabel(label)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120), "ablate")
    finally:
        plt.close(fig)


def run(argv=None) -> dict:
    """Run (or finish) the grid; write ablation.json / .md / .png; return the summary."""
    args, train_flags = build_parser().parse_known_args(argv)
    explicit_specs = args.specs is not None
    presets = _parse_list(args.presets) if args.presets else [args.preset]
    for preset in presets:
        if preset not in config_mod.PRESETS:
            raise ValueError(f"--presets: unknown preset {preset!r}; choose from {', '.join(config_mod.PRESETS)}")
    compare = len(presets) > 1
    specs = _parse_list(args.specs) if explicit_specs else list(DEFAULT_SPECS)
    seeds = _parse_list(args.seeds, int)
    if args.eval_images < 1:
        raise ValueError(f"--eval-images must be >= 1; got {args.eval_images}")
    for flag in ("--order", "--seed", "--out", "--resume"):
        if any(f == flag or f.startswith(flag + "=") for f in train_flags):
            raise ValueError(f"{flag} is set per cell by the ablation; use --specs / --seeds / --out instead")
    for spec in specs:       # a typo is refused; a valid spec that does not fit the grid is skipped below
        try:
            orders.parse_spec(spec)
        except ValueError as e:
            raise ValueError(f"--specs: {e}") from None
    bases = {p: config_mod.parse_args(["--preset", p, *train_flags, "--probe", "false"]) for p in presets}
    base = bases[presets[0]]
    from .runtime.threads import set_threads
    print(set_threads(base.train.threads), file=sys.stderr, flush=True)   # the evaluations run here too
    config_mod.check_args(args, {"out": config_mod.writable_dir()})
    lock = lock_run_dir(args.out, True, "ablate", args.force)   # its own directory, one ablation at a time
    try:
        return _run_grid(args, train_flags, specs, seeds, bases, presets, explicit_specs, compare)
    finally:
        lock.release()


def _run_grid(args, train_flags: list, specs: list, seeds: list, bases: dict, presets: list, explicit_specs: bool,
              compare: bool) -> dict:
    base = bases[presets[0]]
    os.makedirs(os.path.join(args.out, "cells"), exist_ok=True)
    grid = (base.model.img_size // base.model.patch_size,) * 2
    # cells: (label, preset, order spec); a label names a spec (one preset) or a preset (comparing)
    plan = []
    for preset in presets:
        for spec in (specs if explicit_specs or not compare else [bases[preset].train.order]):
            label = spec if not compare else (preset if not explicit_specs else f"{preset}@{spec}")
            plan.append((label, preset, spec))
    runnable, skipped = [], {}
    for label, preset, spec in plan:
        p_grid = (bases[preset].model.img_size // bases[preset].model.patch_size,) * 2
        try:
            orders.check_fits(spec, p_grid)
            runnable.append((label, preset, spec))
        except ValueError as e:
            skipped[label] = str(e)
            print(f"skipping {label}: {e}", file=sys.stderr, flush=True)
    if not runnable:
        raise ValueError(f"no spec of --specs {args.specs} fits the {grid[0]}x{grid[1]} token grid "
                         f"({'; '.join(skipped.values())}); pass specs with fewer segments")
    cells = []
    for label, preset, spec in runnable:
        for seed in seeds:
            cell_dir = os.path.join(args.out, "cells", _cell_name(label, seed))
            result_path = os.path.join(cell_dir, "result.json")
            cfg = config_mod.parse_args(["--preset", preset, *train_flags, "--probe", "false", "--order", spec,
                                         "--seed", str(seed), "--out", cell_dir, "--resume", "latest"])
            if os.path.exists(result_path):
                with open(result_path) as fh:
                    cells.append({**json.load(fh), "label": label})
                _check_cell(cells[-1], cfg, result_path)
                print(f"{label} seed {seed}: done before (probe {cells[-1]['probe']:.4f}, k-NN {cells[-1]['knn']:.4f})",
                      flush=True)
                continue
            result = {**_train_cell(cfg, args.eval_images), "label": label}
            from .eval.probe import save_json
            save_json(result, result_path)
            cells.append(result)
            print(f"{label} seed {seed}: probe {result['probe']:.4f}, k-NN {result['knn']:.4f}, attentive probe "
                  f"{result['attn']:.4f} ({result['train_s']:.0f} s)", flush=True)
    summary = summarise(cells, [label for label, _, _ in runnable])
    report = {"preset": args.preset, "presets": presets, "train_flags": train_flags, "data": base.data.data, "seeds": seeds,
              "grid": list(grid), "skipped": skipped, "config": config_mod.to_dict(base), "torch": torch.__version__,
              "cells": cells, "summary": summary}
    from .eval.probe import save_json
    save_json(report, os.path.join(args.out, "ablation.json"))
    atomic_text(os.path.join(args.out, "ablation.md"), table(summary), "ablate")
    print(table(summary), flush=True)
    if not args.no_plot:
        what = (f"method comparison: {base.data.data}, {', '.join(presets)}" if compare
                else f"order ablation: {base.data.data}, {base.model.model}")
        plot(summary, os.path.join(args.out, "ablation.png"), f"{what}, {base.train.steps} steps, seeds {seeds}")
    return summary


def main(argv=None) -> int:
    from . import started
    started()                # Ctrl-C is this command's to handle from here
    try:
        return run_command(run, argv, errors=(ValueError, FileNotFoundError, ImportError))
    except KeyboardInterrupt:
        print("interrupted; finished cells are kept (run the same command again to go on)", file=sys.stderr, flush=True)
        return 130
    finally:
        release_all()


if __name__ == "__main__":
    from .train.trainer import exit_process   # gloo threads outlive the process group: see there
    exit_process(main())
