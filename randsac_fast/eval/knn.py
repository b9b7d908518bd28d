"""k-NN monitor: weighted k-nearest-neighbour accuracy of frozen features (DINO's protocol).

Every validation image votes with its k most cosine-similar training images; a neighbour with
similarity s adds exp(s / T) to its class. No training, so it is cheap evidence, while pre-training
runs, that the representation improves. Features are the encoder's average-pooled patch tokens
(:func:`randsac_fast.eval.linprobe.pooled`), L2-normalised.

Distributed: each rank embeds its own shard of both splits (every image in exactly one shard;
shorter shards are padded with marked repeats that are dropped before scoring); the training bank
is all-gathered so every rank classifies its validation shard against the whole bank, and the hit
counts are summed: every image is scored once.

Also a command: ``python -m randsac_fast.eval.knn --ckpt CKPT --data DATA`` (``randsac-knn``).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import data as data_mod
from ..runtime import collectives
from .linprobe import eval_transform, labelled_splits, pooled

__all__ = ["knn_classify", "knn_accuracy", "knn_evaluate", "embed", "labelled_loaders", "main"]


class _EvalShard(torch.utils.data.Dataset):
    """A rank's evaluation items keyed by (index, real): a padding item (``real`` False) repeats a
    real image with label -1, so every rank runs the same number of forwards (a sharded model runs
    collectives in each) and :func:`embed` drops the padding: no image is scored twice."""

    def __init__(self, source, view, seed: int):
        self.items = data_mod.AugmentedDataset(source, view, seed)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        index, real = key
        item = self.items[(0, index)]
        return item if item is None or real else (item[0], -1)


def labelled_loaders(data: str, img_size: int, mean, std, batch_size: int, rank: int = 0, world: int = 1,
                     limit: int | None = None, seed: int = 0):
    """(train loader, val loader) of un-augmented images for this rank, from the labelled splits of
    ``data`` (:func:`randsac_fast.eval.linprobe.labelled_splits`): an evaluation root with train/ and
    val/, CIFAR pickles or digits. Every image of a split is in exactly one rank's shard (rank r
    takes images r, r + world, ...); shorter shards are padded with marked repeats so every rank
    gets the same number of batches. ``limit`` caps each split's size (a fixed random subset) to
    keep the monitor cheap."""
    view = eval_transform(img_size, mean, std)
    loaders = []
    for source in labelled_splits(data):
        n = len(source) if limit is None else min(limit, len(source))
        pick = (list(range(n)) if n == len(source) else   # a fixed random subset of the split
                torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:n].tolist())
        mine = pick[rank::world]
        per_rank = -(-n // world)
        keys = [(i, True) for i in mine] + [(mine[0] if mine else pick[0], False)] * (per_rank - len(mine))
        batches = [keys[k:k + batch_size] for k in range(0, per_rank, max(1, batch_size))]
        loaders.append(torch.utils.data.DataLoader(_EvalShard(source, view, seed), batch_sampler=batches,
                                                   collate_fn=data_mod.collate))
    return tuple(loaders)


@torch.no_grad()
def embed(model: nn.Module, loader, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """(features [N, D] L2-normalised fp32, labels [N]) of every (images, labels, ...) batch of loader."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for batch in loader:
        images, y = batch[0], batch[1]
        if device is not None:
            images = images.to(device, non_blocking=True)
        x = pooled(model, images)
        y = y.to(x.device)
        real = y >= 0                                  # padding items (label -1) only keep ranks in step
        feats.append(F.normalize(x, dim=-1)[real])
        labels.append(y[real])
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_classify(train_feats: Tensor, train_labels: Tensor, query: Tensor, k: int = 20, T: float = 0.07,
                 num_classes: int | None = None, chunk: int = 1024) -> Tensor:
    """Class scores [M, C] of query [M, D] from bank train_feats [N, D] (rows L2-normalised).

    The k nearest by cosine similarity each add exp(sim / T) to their class (DINO's weighting).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    k = min(k, train_feats.shape[0])
    num_classes = num_classes or int(train_labels.max()) + 1
    out = []
    for q in query.split(chunk):                     # bounds the [chunk, N] similarity matrix
        sim, idx = (q @ train_feats.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device, dtype=sim.dtype)
        out.append(votes.scatter_add_(1, train_labels[idx], (sim / T).exp()))
    return torch.cat(out)


def _gather(t: Tensor) -> Tensor:
    """Concatenate a per-rank tensor of possibly different lengths along dim 0 (all ranks)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    sizes = [int(s) for s in collectives.all_gather(torch.tensor([t.shape[0]]))]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = collectives.all_gather(padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)


@torch.no_grad()
def knn_evaluate(model: nn.Module, train_loader, val_loader, k: int = 20, T: float = 0.07,
                 device: torch.device | None = None) -> dict:
    """{'top1', 'val_images' (scored), 'train_images' (in the bank)}: weighted k-NN accuracy of
    ``model.forward_features`` (avg-pooled) on val_loader against the bank of train_loader.

    Loaders yield (images [B, C, H, W], labels [B], ...), each rank its own shard (or the whole set
    in one process); labels of -1 mark padding. Collective when a process group is up: every rank
    must call it.
    """
    bank, bank_labels = embed(model, train_loader, device)
    bank, bank_labels = _gather(bank), _gather(bank_labels)
    query, labels = embed(model, val_loader, device)
    num_classes = int(torch.cat([bank_labels, labels]).max()) + 1
    pred = knn_classify(bank, bank_labels, query, k, T, num_classes).argmax(dim=1)
    counts = torch.tensor([(pred == labels).sum().item(), labels.numel()], dtype=torch.float64,
                          device=query.device)
    counts = collectives.all_reduce(counts)
    return {"top1": float(counts[0] / counts[1].clamp(min=1)), "val_images": int(counts[1]),
            "train_images": int(bank.shape[0])}


def knn_accuracy(model: nn.Module, train_loader, val_loader, k: int = 20, T: float = 0.07,
                 device: torch.device | None = None) -> float:
    """Top-1 of :func:`knn_evaluate`."""
    return knn_evaluate(model, train_loader, val_loader, k, T, device)["top1"]


# --------------------------------------------------------------------------------------------
# The command: python -m randsac_fast.eval.knn (randsac-knn)
# --------------------------------------------------------------------------------------------
def build_parser():
    import argparse

    from .. import config as config_mod
    from .. import interop
    p = config_mod.Parser(prog="python -m randsac_fast.eval.knn",
                          description="Weighted k-NN accuracy (DINO's protocol) of a frozen RandSAC / SAIM encoder's "
                                      "avg-pooled features: every validation image votes with its k most similar "
                                      "training images (torchrun for several processes).",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    interop.add_checkpoint_args(p)
    p.add_argument("--data", required=True, help="digits, a directory with train/ and val/, or CIFAR pickles")
    p.add_argument("--k", type=int, default=20, help="neighbours that vote")
    p.add_argument("--temperature", type=float, default=0.07, help="a neighbour of similarity s adds exp(s / T)")
    p.add_argument("--images", type=int, default=None, help="at most this many images of each split (None: all)")
    p.add_argument("--batch-size", type=int, default=256, help="images per rank per forward")
    p.add_argument("--out", default=None, help="also write results.json in this directory (None: print only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --images subset")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op CPU threads per process (None: OMP_NUM_THREADS, else the cores available / local ranks)")
    return p


def run(argv=None) -> dict:
    """Score the checkpoint; returns {'top1', 'val_images', 'train_images', ...}. Raises on bad input."""
    from .. import config as config_mod
    from .. import interop
    from ..runtime.parallel import init_distributed
    from ..runtime.summary import write_results
    from .linprobe import check_channels, labelled_splits, load_encoder, norm_stats, say_threads
    args = build_parser().parse_args(argv)
    config_mod.check_args(args, {"k": config_mod.at_least(1), "temperature": config_mod.positive(),
                                 "images": config_mod.optional(config_mod.at_least(1)),
                                 "batch_size": config_mod.at_least(1), "seed": config_mod.integer(),
                                 "device": config_mod.RULES["device"], "threads": config_mod.RULES["threads"]})
    train_src, _ = labelled_splits(args.data)
    encoder, meta = load_encoder(args.ckpt, args.model, interop.parse_sets(args.set), args.backend)
    check_channels(encoder, train_src, args.ckpt)
    mean, std = norm_stats(meta, train_src)
    dist_info = init_distributed(args.device)
    say_threads(args.threads, dist_info.is_main)
    loaders = labelled_loaders(args.data, encoder.img_size[0], mean, std, args.batch_size, dist_info.rank,
                               dist_info.world, limit=args.images, seed=args.seed)
    result = knn_evaluate(encoder.to(dist_info.device), *loaders, k=args.k, T=args.temperature, device=dist_info.device)
    result.update(k=args.k, temperature=args.temperature, ckpt=args.ckpt, data=args.data)
    if args.out and dist_info.is_main:
        os.makedirs(args.out, exist_ok=True)
        result["results_file"] = write_results(args.out, {**result, "args": vars(args)})
    return result


def main(argv=None) -> int:
    from ..runtime.summary import print_summary, run_command

    def body(argv):
        result = run(argv)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print_summary("k-NN done", {
                "checkpoint": result["ckpt"],
                "result": f"k-NN top-1 {result['top1']:.4f} ({result['val_images']} validation images scored "
                          f"against {result['train_images']} training images, k={result['k']})",
                "results file": result.get("results_file")})
    from .. import ops
    return run_command(body, argv, errors=(ValueError, TypeError, OSError, ImportError, ops.BackendUnavailable))


if __name__ == "__main__":
    sys.exit(main())
