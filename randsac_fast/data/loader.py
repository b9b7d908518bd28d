"""The run's batch stream: deterministic per-rank micro-batches, one DataLoader for the whole run.

The data position of a run is the number of micro-batches consumed (``micro`` in the checkpoint).
Micro-batch k is a pure function of (seed, k, rank, world, batch size): for an indexed source
(folder, CIFAR, digits) the epoch's seeded permutation gives the indices and each sample's crop is
seeded by (seed, epoch, index), so the stream resumes at the exact micro-batch with any number of
workers. Tar shards (``shards.py``) resume exactly too, for the same ranks and workers.

The DataLoader is built once, over a batch sampler that never ends (epoch after epoch), so its
workers live for the whole run; batches are prefetched and pinned on CUDA. :class:`BatchStream`
records how long the training process waited for each batch.

The training process owns shutdown. A scheduler's SIGTERM usually reaches every process of the job
(``timeout``, Slurm's ``scancel`` and preemption signal the whole process group; torchrun forwards
to each worker's group), and a DataLoader worker that died of it would take the run down before
the checkpoint is written. So loader workers ignore :data:`STOP_SIGNALS`; they exit when the
training process closes the stream, or on their own when it is gone.
"""
from __future__ import annotations

import os
import signal
import time

import torch

from ..runtime.preempt import STOP_SIGNALS
from .images import DataError
from .transforms import augment_sample, normalize, sample_seed

__all__ = ["AugmentedDataset", "ShardedBatches", "BatchStream", "batch_stream", "collate", "resolve_workers",
           "auto_workers", "STOP_SIGNALS", "IgnoreStopSignals"]

PREFETCH = 4   # batches in flight per worker: slack for steps that take longer (logging, checkpoints)


class AugmentedDataset(torch.utils.data.Dataset):
    """Items are keyed by (epoch, index); returns (image, label) or None for an unreadable image."""

    def __init__(self, source, augment, seed: int):
        self.source, self.augment, self.seed = source, augment, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        epoch, index = key
        img = augment_sample(self.augment, self.source.load(index), self.seed, epoch, index)
        return None if img is None else (img, self.source.label(index))


def collate(items):
    """Drop unreadable images; return (images [b, C, S, S], labels [b], skipped count)."""
    good = [it for it in items if it is not None]
    if not good:
        raise DataError(f"every image of a batch of {len(items)} was unreadable (see the warnings)")
    images = torch.stack([im for im, _ in good])
    labels = torch.tensor([lb for _, lb in good])
    return images, labels, len(items) - len(good)


class ShardedBatches:
    """Per-epoch shuffled indices, split across ranks, cut into micro-batches.

    Every rank gets the same number of micro-batches per epoch (the tail that does not divide
    evenly is dropped), so all ranks step together.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int):
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.per_epoch = (n // world) // batch_size
        if self.per_epoch == 0:
            raise DataError(f"{n} images cannot fill one batch of {batch_size} on each of {world} ranks; "
                            "lower --batch-size")

    def epoch(self, epoch: int) -> list[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1))
        order = torch.randperm(self.n, generator=g)[self.rank::self.world].tolist()
        b = self.batch_size
        return [[(epoch, i) for i in order[k * b:(k + 1) * b]] for k in range(self.per_epoch)]


class _RunBatches:
    """The micro-batches of the run from number ``start`` on, epoch after epoch; never ends."""

    def __init__(self, batches: ShardedBatches, start: int):
        self.batches, self.start = batches, start

    def __iter__(self):
        epoch, offset = divmod(self.start, self.batches.per_epoch)
        while True:
            yield from self.batches.epoch(epoch)[offset:]
            epoch, offset = epoch + 1, 0


def auto_workers(cores: int | None = None, local_ranks: int | None = None) -> int:
    """``--workers auto``: the cores this process may use, shared by the ranks of this node
    (``LOCAL_WORLD_SIZE``), minus one core per rank for the training process itself; at most 16."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local_ranks is None:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(16, cores // max(1, local_ranks) - 1))


def resolve_workers(value) -> int:
    """``auto`` or a whole number >= 0 (as int or text) -> the number of loader worker processes."""
    text = str(value).strip().lower()
    if text == "auto":
        return auto_workers()
    if not text.isdigit():
        raise ValueError(f"--workers must be auto or a whole number >= 0; got {value!r}")
    return int(text)


class IgnoreStopSignals:
    """A DataLoader ``worker_init_fn``: ignore :data:`STOP_SIGNALS`, then call ``then`` (if any).

    The workers start with these signals blocked (see :func:`_stop_signals_blocked`), so one that
    arrives while a worker starts cannot kill it: it stays pending until it is ignored here.
    """

    def __init__(self, then=None):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if self.then is not None:
            self.then(worker_id)


class _stop_signals_blocked:
    """Block :data:`STOP_SIGNALS` in this thread while loader workers (and the pinning thread) start:
    forked workers inherit the mask, and a signal arriving meanwhile is delivered here afterwards."""

    def __enter__(self):
        self._before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self._before)


class BatchStream:
    """(images, labels, skipped) forever. ``wait_s`` adds up the time spent waiting for batches.

    With ``device`` the images are copied there (asynchronously from pinned memory) and, with
    ``norm=(mean, std)``, normalised there: uint8 crops travel as uint8.
    """

    def __init__(self, loader, device=None, norm=None, state=None):
        self.loader, self.device, self.norm, self._state = loader, device, norm, state
        with _stop_signals_blocked():
            self._it = iter(loader)
        self.wait_s = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        images, labels, skipped = next(self._it)
        self.wait_s += time.perf_counter() - t0
        if self.device is not None:
            images = images.to(self.device, non_blocking=True)
        if self.norm is not None:
            images = normalize(images, *self.norm)
        return images, labels, skipped

    def take_wait(self) -> float:
        """Seconds waited since the last call."""
        waited, self.wait_s = self.wait_s, 0.0
        return waited

    def state(self, micro: int) -> dict:
        """Where the stream stands after ``micro`` micro-batches (for the checkpoint's meta.json)."""
        return self._state(micro) if self._state is not None else {"kind": "indexed", "micro": micro}

    def close(self) -> None:
        """Stop the worker processes now (they would also stop when the stream is garbage-collected)."""
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def batch_stream(dataset: AugmentedDataset, batches: ShardedBatches, start: int, workers, pin_memory: bool,
                 device=None, norm=None, worker_init_fn=None) -> BatchStream:
    """The run's stream from micro-batch ``start``; ``workers``: a number or ``auto``. The workers
    ignore the stop signals (:class:`IgnoreStopSignals`), then run ``worker_init_fn`` if given."""
    workers, state = resolve_workers(workers), None
    if getattr(dataset.source, "sequential", False):          # tar shards: an iterable dataset
        from .shards import ShardDataset
        items = ShardDataset(dataset.source, dataset.augment, dataset.seed, batches, start, workers)
        workers, state, batching = items.workers, items.state, {"batch_size": batches.batch_size}
    else:
        items, batching = dataset, {"batch_sampler": _RunBatches(batches, start)}
    # Its own generator: creating the loader's iterator must not draw from the global RNG, which the
    # caller's checkpoint restores (a resumed run creates its iterator at another step).
    loader = torch.utils.data.DataLoader(
        items, **batching, num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
        persistent_workers=workers > 0, prefetch_factor=PREFETCH if workers else None,
        worker_init_fn=IgnoreStopSignals(worker_init_fn) if workers else worker_init_fn,
        generator=torch.Generator().manual_seed(batches.seed))
    return BatchStream(loader, device, norm, state)
