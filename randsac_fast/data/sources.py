"""Image sources: in-memory tensors (digits, CIFAR, synthetic) and ImageFolder trees.

A source has ``len()``, ``load(i)`` (an image, or None when it cannot be read), ``label(i)``,
``channels``, ``mean`` / ``std`` and ``name``. In-memory sources return float images [C, H, W] in
[0, 1]; an ImageFolder returns an :class:`EncodedImage` (bytes + size), decoded by the transform.
Tar shards (``ShardSource``) are read in sequence only; ``shards.py`` streams them.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
import sys
import tarfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .images import DataError, EncodedImage, UnreadableImage, _pil

__all__ = ["TensorSource", "SyntheticSource", "ImageFolderSource", "digits", "cifar", "open_source",
           "is_shard_spec", "pretraining_root", "ShardSource", "IMAGE_KEYS", "IMAGENET_MEAN", "IMAGENET_STD", "CIFAR_MEAN", "CIFAR_STD", "IMAGE_EXTS"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def is_shard_spec(data: str) -> bool:
    """True for tar shards: a pattern or file ending in ``.tar``, or a directory holding ``.tar`` files."""
    if data.endswith(".tar"):
        return True
    return os.path.isdir(data) and bool(glob.glob(os.path.join(data, "*.tar")))


class TensorSource:
    """Images held in memory: images [N, C, H, W] float in [0, 1], labels [N]."""

    def __init__(self, name: str, images: Tensor, labels: Tensor, mean, std):
        self.name, self.images, self.labels = name, images, labels
        self.mean, self.std = tuple(mean), tuple(std)
        self.channels = images.shape[1]

    def __len__(self) -> int:
        return self.images.shape[0]

    def load(self, i: int) -> Tensor | None:
        return self.images[i]

    def label(self, i: int) -> int:
        return int(self.labels[i])


def digits(split: str = "all") -> TensorSource:
    """scikit-learn's digits as [N, 1, 8, 8] in [0, 1]; split train (75%) / test (25%) is fixed."""
    from sklearn.datasets import load_digits
    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    labels = torch.from_numpy(d.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1797))
    n_train = len(labels) * 3 // 4
    pick = {"all": order, "train": order[:n_train], "test": order[n_train:]}
    if split not in pick:
        raise ValueError(f"digits split must be all, train or test; got {split!r}")
    idx = pick[split]
    # Statistics of the whole set, so that all splits share one normalisation.
    return TensorSource(f"digits-{split}", images[idx], labels[idx], (float(images.mean()),),
                        (float(images.std()),))


class SyntheticSource:
    """Random smooth images (a low-resolution noise field upsampled), reproducible per index."""

    def __init__(self, size: int, img_size: int, channels: int = 3):
        self.name, self.size, self.img_size, self.channels = "synthetic", size, img_size, channels
        self.mean, self.std = (0.5,) * channels, (0.25,) * channels

    def __len__(self) -> int:
        return self.size

    def load(self, i: int) -> Tensor:
        g = torch.Generator().manual_seed(i)
        low = torch.rand(1, self.channels, 8, 8, generator=g)
        return F.interpolate(low, size=(self.img_size, self.img_size), mode="bilinear",
                             align_corners=False)[0]

    def label(self, i: int) -> int:
        return i % 10


def cifar(root: str) -> TensorSource:
    """CIFAR-10 (``data_batch_1..5``) or CIFAR-100 (``train``) python pickles in ``root``."""
    if os.path.exists(os.path.join(root, "data_batch_1")):
        files, key, name = [f"data_batch_{i}" for i in range(1, 6)], b"labels", "cifar10"
    else:
        files, key, name = ["train"], b"fine_labels", "cifar100"
    data, labels = [], []
    for f in files:
        path = os.path.join(root, f)
        if not os.path.exists(path):
            raise DataError(f"CIFAR file {path} is missing; expected the python-pickle layout "
                            "(cifar-10-batches-py or cifar-100-python)")
        pixels, batch_labels = read_cifar_pickle(path, key)
        data.append(pixels)
        labels.extend(batch_labels)
    images = torch.from_numpy(np.concatenate(data)).float() / 255.0
    return TensorSource(name, images, torch.tensor(labels), CIFAR_MEAN, CIFAR_STD)


def read_cifar_pickle(path: str, label_key: bytes) -> tuple[np.ndarray, list[int]]:
    """One CIFAR python-pickle file -> (uint8 images [n, 3, 32, 32], n integer labels).

    Anything else (truncated, another pickle, wrong sizes) is a DataError naming the file."""
    def bad(why: str) -> DataError:
        return DataError(f"CIFAR file {path} is not a CIFAR python pickle ({why}); re-download the python version "
                         "of the data set (cifar-10-python.tar.gz / cifar-100-python.tar.gz) and extract it again")
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except Exception as e:  # unpickling garbage can raise almost anything
        raise bad(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise bad(f"expected a dict with keys b'data' and {label_key!r}")
    pixels, labels = np.asarray(batch[b"data"]), list(batch[label_key])
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
        raise bad(f"data is {pixels.dtype} {pixels.shape}, expected uint8 [n, 3072]")
    if len(labels) != pixels.shape[0] or not all(isinstance(v, (int, np.integer)) and v >= 0 for v in labels):
        raise bad(f"{len(labels)} labels for {pixels.shape[0]} images, or labels that are not integers >= 0")
    return pixels.reshape(-1, 3, 32, 32), [int(v) for v in labels]


class ImageFolderSource:
    """``root/<class>/<image>`` files, decoded with Pillow on demand; unreadable files are skipped."""

    def __init__(self, root: str):
        _pil()   # missing Pillow: one ImportError line now, not a traceback from every loader worker later
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.classes, self.files = classes, []
        for c, cls in enumerate(classes):
            for dirpath, _, names in sorted(os.walk(os.path.join(root, cls))):
                self.files += [(os.path.join(dirpath, n), c) for n in sorted(names)
                               if n.lower().endswith(IMAGE_EXTS)]
        if not self.files:
            raise DataError(f"data directory {root} holds no images; expected {root}/<class>/<image> "
                            f"with extensions {', '.join(IMAGE_EXTS)} (or CIFAR python pickles)")
        self.name, self.channels = f"imagefolder:{root}", 3
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> EncodedImage | None:
        """The file's bytes and size (pixels are decoded by the transform, at the crop's resolution);
        None, with a warning naming the file, when it cannot be read or is not an image."""
        try:
            return EncodedImage.read(self.files[i][0])
        except UnreadableImage as e:
            warnings.warn(str(e), stacklevel=2)
            return None

    def label(self, i: int) -> int:
        return self.files[i][1]


def pretraining_root(data: str) -> str:
    """``--data`` of pre-training: an evaluation root (``train/`` and ``val/`` side by side) means
    its ``train/`` -- taken as an ImageFolder it would be two classes of images, train and val.
    Says so (rank 0) when it redirects."""
    if os.path.isdir(os.path.join(data, "train")) and os.path.isdir(os.path.join(data, "val")):
        train = os.path.join(data, "train")
        if os.environ.get("RANK", "0") == "0":
            print(f"--data {data} holds train/ and val/ (an evaluation root): pre-training on {train}; "
                  f"val/ is left for evaluation (pass --data {train} to say it directly)", file=sys.stderr, flush=True)
        return train
    return data


def open_source(data: str, img_size: int, synthetic_size: int = 4096, split: str = "train"):
    """Resolve ``--data``: ``digits``, ``synthetic``, tar shards (a brace pattern such as
    ``shards/train-{000000..001023}.tar``, one ``.tar`` file, or a directory of ``.tar`` files) or a
    directory (CIFAR pickles or ImageFolder)."""
    if data == "digits":
        return digits(split)
    if data == "synthetic":
        return SyntheticSource(synthetic_size, img_size)
    if is_shard_spec(data):
        return ShardSource(data)
    if not os.path.isdir(data):
        raise DataError(f"data directory {data!r} does not exist; pass --data DIR (an ImageFolder tree "
                        "or CIFAR python pickles), or --data digits / --data synthetic")
    if not os.listdir(data):
        raise DataError(f"data directory {data!r} is empty; it must hold <class>/<image> folders or "
                        "CIFAR python pickles")
    names = set(os.listdir(data))
    if "data_batch_1" in names or {"train", "meta"} <= names:
        return cifar(data)
    return ImageFolderSource(data)


# --------------------------------------------------------------------------------------------
# WebDataset tar shards
# --------------------------------------------------------------------------------------------
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
SIZES = "sizes.json"


def webdataset_module():
    try:
        import webdataset
    except ImportError:
        raise DataError("tar shards need the webdataset library: pip install webdataset "
                        "(or pip install 'randsac_fast[data]')") from None
    return webdataset


def expand(spec: str) -> list[str]:
    """A brace pattern (``train-{000000..001023}.tar``), one ``.tar`` file or a directory of them."""
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.tar")))
    webdataset_module()
    import braceexpand
    return list(braceexpand.braceexpand(spec))


class ShardSource:
    """Tar shards as a source: ``len()`` = records in all shards; read sequentially (``records``)."""
    sequential = True

    def __init__(self, spec: str, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        _pil()   # as ImageFolderSource: say it before any worker starts
        self.urls = expand(spec)
        if not self.urls:
            raise DataError(f"--data {spec!r} names no tar shards")
        missing = [u for u in self.urls if not os.path.isfile(u)]
        if missing:
            raise DataError(f"{len(missing)} of {len(self.urls)} shards of --data {spec!r} do not exist "
                            f"(first: {missing[0]}); check the brace range")
        self.sizes = _shard_sizes(self.urls)
        self.offsets = [0]
        for n in self.sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.name, self.channels, self.mean, self.std = f"shards:{spec}", 3, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return sum(self.sizes)

    def records(self, shard: int):
        """(index in the shard, webdataset sample dict) of every record of shard number ``shard``."""
        wds = webdataset_module()
        samples = wds.tariterators.tarfile_samples(iter([{"url": self.urls[shard]}]),
                                                   handler=wds.handlers.warn_and_continue)
        return enumerate(samples)

    @staticmethod
    def image_of(sample: dict):
        """(EncodedImage or None, label) of one record; None when it has no image member."""
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        label = int(sample["cls"]) if "cls" in sample else -1
        name = f"{sample.get('__url__')}:{sample.get('__key__')}"
        if key is None:
            warnings.warn(f"skipping record {name}: no image member ({', '.join(IMAGE_KEYS)})", stacklevel=2)
            return None, label
        return EncodedImage(sample[key], name), label


def _shard_sizes(urls: list[str]) -> list[int]:
    """Records per shard: from sizes.json in the shards' folder when it lists them all, else by
    counting distinct member keys in the tar headers (the members' data are skipped, not read)."""
    path = os.path.join(os.path.dirname(urls[0]), SIZES)
    if os.path.isfile(path):
        with open(path) as fh:
            known = json.load(fh)
        if all(os.path.basename(u) in known for u in urls):
            return [int(known[os.path.basename(u)]) for u in urls]
    sizes = []
    for u in urls:
        try:
            with tarfile.open(u, "r:") as tf:
                sizes.append(len({m.name.split(".", 1)[0] for m in tf if m.isreg()}))
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"shard {u} is not a readable tar file ({e})") from None
    return sizes
