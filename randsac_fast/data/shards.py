"""WebDataset tar shards: reading (split across ranks and workers, seeded shuffle buffer, exact resume)
and writing them from an ImageFolder (``python -m randsac_fast.data make-shards SRC_DIR OUT_DIR``).

A sample is a group of tar members sharing a key: the image (``.jpg``, ``.png``, ...) as the file's
original bytes and its class index as text (``.cls``) — the layout OpenCLIP and timm read. Shard
sizes come from ``sizes.json`` next to the shards (written by ``make-shards``; OpenCLIP's format),
else from one scan of the tar headers.

How the stream is cut, per epoch e: the shard list is permuted by a generator seeded by
(seed, e) (the same on every rank); rank r takes shards r, r + world, ...; its worker w of W takes
every W-th of those. A worker reads its shards in that order through a shuffle buffer (webdataset's,
driven by a generator seeded by (seed, e, rank, worker)), which is drained at the end of the epoch,
and cuts the result into micro-batches of ``batch_size`` records; the DataLoader takes micro-batches
from workers 0, 1, ..., W-1 in turn. Each sample's crop is seeded by (seed, e, its index in the
shard list's record numbering), as for a folder.

Resume: micro-batch k came from worker k mod W (a resumed loader's worker i plays worker
(start + i) mod W), so the checkpoint's micro-batch count fixes how many
records each worker had delivered; a worker skips whole epochs by the shard sizes and replays the
current epoch's records (reading, not decoding) through the seeded buffer up to its position. The
resumed stream is bitwise the uninterrupted one when the shard list, --batch-size, the number of
ranks and --workers are unchanged; the checkpoint records them (and each worker's epoch and
position) and a resume with other values warns that the current epoch's order changes.
Unreadable images inside a shard are skipped with a warning and counted in ``skipped_images``; a
tar file damaged mid-way is read up to the damage (webdataset warns), which shortens that epoch.
"""
from __future__ import annotations

import glob
import json
import os
import random
import time
import warnings

import torch

from .images import DataError
from .sources import SIZES, ImageFolderSource, ShardSource, webdataset_module
from .transforms import augment_sample, sample_seed

__all__ = ["ShardDataset", "make_shards", "resume_changes"]

SHUFFLE_BUFFER = 1000   # records per worker held for shuffling (raw bytes: ~0.1 GB for ImageNet JPEGs)


def resume_changes(saved: dict | None, now: dict) -> list[str]:
    """Lines to print when a shard stream resumes with a layout other than the checkpoint's.

    ``saved``: the stream state in the checkpoint's meta (None: not a resume); ``now``: the resumed
    stream's :meth:`ShardDataset.state`. The position is kept per worker as a record count, so a
    changed shard list, rank count, worker count or per-rank batch maps it onto other records."""
    if not saved or saved.get("kind") != "shards" or now.get("kind") != "shards":
        return []
    names = {"shards": "shards", "world": "ranks", "workers": "--workers per rank", "batch_size": "per-rank batch"}

    def layout(state: dict, key: str):
        return max(1, state[key]) if key == "workers" else state.get(key)   # 0 workers reads as 1 (in-process)
    changed = [f"{names[k]} {saved[k]} -> {now.get(k)}" for k in names if k in saved and layout(saved, k) != layout(now, k)]
    if not changed:
        return []
    epochs = sorted({w["epoch"] for w in saved.get("rank0_workers") or []})
    where = f"epoch {epochs[0]}" if len(epochs) == 1 else "the current epoch"
    return [f"warning: resuming the shard stream with {', '.join(changed)} (checkpoint -> now): the rest of "
            f"{where} is read in a different order and some of its records may be seen twice or not at all; "
            "later epochs are whole passes, in an order other than the uninterrupted run's. Resume with the "
            "checkpoint's values to continue the stream exactly."]


class ShardDataset(torch.utils.data.IterableDataset):
    """One rank's records as augmented (image, label) items (None when unreadable), see the module doc."""

    def __init__(self, source: ShardSource, augment, seed: int, batches, start: int, workers: int,
                 buffer: int = SHUFFLE_BUFFER):
        self.source, self.augment, self.seed, self.buffer = source, augment, seed, buffer
        self.rank, self.world, self.batch_size, self.start = batches.rank, batches.world, batches.batch_size, start
        n = len(source.urls)
        if n < self.world:
            raise DataError(f"{n} shards cannot be split across {self.world} ranks; write at least {self.world} "
                            "(make-shards --shard-size smaller)")
        self.workers = min(workers, n // self.world)
        if self.workers < workers:
            warnings.warn(f"--workers {workers}: {n} shards give each of {self.world} ranks {n // self.world}; "
                          f"using {self.workers} workers", stacklevel=2)

    def _shards(self, epoch: int, worker: int, workers: int) -> list[int]:
        order = list(range(len(self.source.urls)))
        random.Random(sample_seed(self.seed, epoch, -1)).shuffle(order)
        return order[self.rank::self.world][worker::workers]

    def _delivered(self, micro: int, worker: int, workers: int) -> int:
        """Records worker ``worker`` had delivered when the stream stood at micro-batch ``micro``."""
        return max(0, -(-(micro - worker) // workers)) * self.batch_size

    def _position(self, records: int, worker: int, workers: int) -> tuple[int, int]:
        """(epoch, records into it) of a worker that has delivered ``records``."""
        epoch = 0
        while True:
            n = sum(self.source.sizes[s] for s in self._shards(epoch, worker, workers))
            if records < n:
                return epoch, records
            records, epoch = records - n, epoch + 1

    def state(self, micro: int) -> dict:
        workers = max(1, self.workers)
        where = [self._position(self._delivered(micro, w, workers), w, workers) for w in range(workers)]
        return {"kind": "shards", "micro": micro, "world": self.world, "workers": self.workers,
                "batch_size": self.batch_size, "shards": len(self.source.urls),
                "rank0_workers": [{"epoch": e, "records_into_epoch": r} for e, r in where] if self.rank == 0 else None}

    def _epoch_records(self, epoch: int, worker: int, workers: int):
        """(global record index, sample) of this worker's shards in epoch order, through the buffer."""
        wds = webdataset_module()

        def raw():
            for s in self._shards(epoch, worker, workers):
                for i, sample in self.source.records(s):
                    yield self.source.offsets[s] + i, sample
        rng = random.Random(sample_seed(self.seed, epoch, -(2 + self.rank * 4096 + worker)))
        return wds.filters._shuffle(raw(), bufsize=self.buffer, initial=self.buffer, rng=rng)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader asks its workers 0, 1, ... in turn from the first batch it hands out, which is
        # micro-batch `start`: loader worker i plays the stream's worker (start + i) mod W.
        worker = (self.start + worker) % workers
        epoch, skip = self._position(self._delivered(self.start, worker, workers), worker, workers)
        while True:
            seen = 0
            for index, sample in self._epoch_records(epoch, worker, workers):
                seen += 1
                if skip:                 # replaying up to the resume position: read, do not decode
                    skip -= 1
                    continue
                img, label = self.source.image_of(sample)
                item = augment_sample(self.augment, img, self.seed, epoch, index)
                yield None if item is None else (item, label)
            if seen == 0:
                raise DataError(f"no readable record in the shards of epoch {epoch} (worker {worker}, "
                                f"rank {self.rank}); see the warnings")
            epoch, skip = epoch + 1, 0


def make_shards(src_dir: str, out_dir: str, shard_size: int = 1000, prefix: str = "train", seed: int = 0, *,
                force: bool = False) -> str:
    """Write the ImageFolder ``src_dir`` as tar shards ``out_dir/<prefix>-NNNNNN.tar`` (files copied
    byte for byte, in a seeded random order so that every shard mixes the classes), plus
    ``sizes.json`` and ``classes.json``. Returns the brace pattern to pass as ``--data``. An
    ``out_dir`` holding another command's files is refused (``randsac_fast.outputs``) unless ``force``."""
    from ..outputs import check_dir, claim_dir
    check_dir(out_dir, "data make-shards", force=force, flag="OUT_DIR")
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1; got {shard_size}")
    wds = webdataset_module()
    src = ImageFolderSource(src_dir)
    claim_dir(out_dir, "data make-shards", force=True, flag="OUT_DIR")   # checked above
    if glob.glob(os.path.join(out_dir, f"{prefix}-*.tar")):
        raise DataError(f"{out_dir} already holds {prefix}-*.tar shards; choose an empty folder or another --prefix")
    order = list(range(len(src)))
    random.Random(seed).shuffle(order)
    # A whole-second mtime keeps every member a plain ustar header: a float one adds a pax header per
    # member, which costs the reader about as much as a quarter of a JPEG decode.
    with wds.ShardWriter(os.path.join(out_dir, f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0,
                         mtime=int(time.time())) as sink:
        for k, i in enumerate(order):
            path, label = src.files[i]
            ext = os.path.splitext(path)[1].lower().lstrip(".")
            with open(path, "rb") as fh:
                sink.write({"__key__": f"{k:09d}", "jpg" if ext == "jpeg" else ext: fh.read(), "cls": str(label)})
    n_shards = -(-len(order) // shard_size)
    names = [f"{prefix}-{s:06d}.tar" for s in range(n_shards)]
    sizes_path = os.path.join(out_dir, SIZES)
    sizes = {}
    if os.path.isfile(sizes_path):          # other prefixes' shards in this folder keep their entries
        with open(sizes_path) as fh:
            sizes = json.load(fh)
    sizes.update({name: min(shard_size, len(order) - s * shard_size) for s, name in enumerate(names)})
    from ..outputs import atomic_text   # temporary name + fsync + rename
    atomic_text(sizes_path, json.dumps(sizes, indent=1), "data make-shards")
    atomic_text(os.path.join(out_dir, "classes.json"), json.dumps(src.classes, indent=1), "data make-shards")
    return os.path.join(out_dir, f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar")
