"""k-NN monitor: weighted k-nearest-neighbour accuracy of frozen features (DINO's protocol).

Every validation image votes with its k most cosine-similar training images; a neighbour with
similarity s adds exp(s / T) to its class. No training, so it is cheap evidence, while pre-training
runs, that the representation improves. Features are the encoder's average-pooled patch tokens
(:func:`randsac_fast.eval.linprobe.pooled`), L2-normalised.

Distributed: each rank embeds its own shard of both splits; the training bank is all-gathered so
every rank classifies its validation shard against the whole bank, and the hit counts are summed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import data as data_mod
from ..runtime import collectives
from .linprobe import eval_transform, labelled_splits, pooled

__all__ = ["knn_classify", "knn_accuracy", "embed", "labelled_loaders"]


def labelled_loaders(data: str, img_size: int, mean, std, batch_size: int, rank: int = 0, world: int = 1,
                     limit: int | None = None, seed: int = 0):
    """(train loader, val loader) of un-augmented images for this rank, from the labelled splits of
    ``data`` (:func:`randsac_fast.eval.linprobe.labelled_splits`). Every rank gets the same number of
    batches (a sharded model runs collectives in each forward); ``limit`` caps each split's size
    (a fixed random subset) to keep the monitor cheap."""
    view = eval_transform(img_size, mean, std)
    loaders = []
    for source in labelled_splits(data):
        n = len(source) if limit is None else min(limit, len(source))
        batches = data_mod.ShardedBatches(n, min(batch_size, n // world), rank, world, seed).epoch(0)
        if n < len(source):   # ShardedBatches draws from range(n): map onto a fixed random subset
            pick = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:n].tolist()
            batches = [[(e, pick[i]) for e, i in b] for b in batches]
        dataset = data_mod.AugmentedDataset(source, view, seed)
        loaders.append(torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=data_mod.collate))
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
        feats.append(F.normalize(x, dim=-1))
        labels.append(y.to(x.device))
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
def knn_accuracy(model: nn.Module, train_loader, val_loader, k: int = 20, T: float = 0.07,
                 device: torch.device | None = None) -> float:
    """Top-1 weighted k-NN accuracy of ``model.forward_features`` (avg-pooled) on val_loader.

    Loaders yield (images [B, C, H, W], labels [B], ...), each rank its own shard (or the whole set
    in one process). Collective when a process group is up: every rank must call it.
    """
    bank, bank_labels = embed(model, train_loader, device)
    bank, bank_labels = _gather(bank), _gather(bank_labels)
    query, labels = embed(model, val_loader, device)
    num_classes = int(torch.cat([bank_labels, labels]).max()) + 1
    pred = knn_classify(bank, bank_labels, query, k, T, num_classes).argmax(dim=1)
    counts = torch.tensor([(pred == labels).sum().item(), labels.numel()], dtype=torch.float64,
                          device=query.device)
    counts = collectives.all_reduce(counts)
    return float(counts[0] / counts[1].clamp(min=1))
