"""Data: image sources, MAE-style augmentation on tensors, and deterministic, resumable sharding.

Sources (all return float images [C, H, W] in [0, 1] and an integer label):
  ``digits``     scikit-learn's bundled 8x8 handwritten digits (1797 images, no download);
  ``synthetic``  random images, for benchmarks;
  a directory    CIFAR-10/100 python pickles (``data_batch_1`` or ``train`` + ``meta``) or an
                 ImageFolder tree (``DIR/class/image.jpg``; needs Pillow).

Every random choice of the augmentation comes from a generator seeded by (seed, epoch, index), so a
sample's crop does not depend on which worker or which rank loads it, nor on whether the run was
resumed. The data position of a run is simply the number of micro-batches consumed.
"""
from __future__ import annotations

import math
import os
import pickle
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["open_source", "pretraining_root", "Augment", "ShardedBatches", "batch_stream", "eval_images", "DataError"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DataError(ValueError):
    """The data cannot be used as given (missing or empty directory, unknown layout)."""


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
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
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.files: list[tuple[str, int]] = []
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

    def load(self, i: int) -> Tensor | None:
        try:
            from PIL import Image
        except ImportError as e:
            raise ImportError("ImageFolder data needs Pillow: pip install pillow") from e
        path = self.files[i][0]
        try:
            with Image.open(path) as im:
                return decode_rgb(im)
        except Exception as e:  # truncated, not an image, unreadable: skip it, say which
            warnings.warn(f"skipping unreadable image {path}: {e}", stacklevel=2)
            return None

    def label(self, i: int) -> int:
        return self.files[i][1]


def decode_rgb(im) -> Tensor:
    """A Pillow image -> float [3, H, W] in [0, 1].

    Pillow's ``convert("RGB")`` clips 16-bit grey images (modes I;16*, and I as PNG opens them)
    at 255, i.e. near-white; they are scaled by their bit depth here instead. Float images (F)
    have no agreed range and are refused."""
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im).astype(np.float32)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"{im.mode} image values span {arr.min():g}..{arr.max():g}, outside 16-bit 0..65535")
        grey = torch.from_numpy(arr / 65535.0)
        return grey.expand(3, *grey.shape).contiguous()
    if im.mode == "F":
        raise ValueError("floating-point (mode F) images have no agreed value range; convert them to 8- or 16-bit")
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
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
    """Resolve ``--data``: ``digits``, ``synthetic`` or a directory (CIFAR pickles or ImageFolder)."""
    if data == "digits":
        return digits(split)
    if data == "synthetic":
        return SyntheticSource(synthetic_size, img_size)
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
# Augmentation on tensors: RandomResizedCrop + horizontal flip + normalisation
# --------------------------------------------------------------------------------------------
def _resize(img: Tensor, size: int) -> Tensor:
    """[C, h, w] -> [C, size, size], bilinear with antialiasing when shrinking."""
    return F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=bool(img.shape[-1] > size or img.shape[-2] > size))[0]


def crop_box(h: int, w: int, scale, ratio, g: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, height, width): area fraction ~ U(scale), log aspect
    ~ U(log ratio); ten tries, then the largest centred box within the ratio range."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1])
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@dataclass
class Augment:
    """Per-sample MAE augmentation; ``__call__(img, g)`` -> normalised [C, img_size, img_size]."""
    img_size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, img: Tensor, g: torch.Generator) -> Tensor:
        top, left, ch, cw = crop_box(img.shape[-2], img.shape[-1], self.scale, self.ratio, g)
        out = _resize(img[:, top:top + ch, left:left + cw], self.img_size)
        if self.hflip and bool(torch.rand(1, generator=g) < 0.5):
            out = out.flip(-1)
        return normalize(out, self.mean, self.std)


def normalize(img: Tensor, mean, std) -> Tensor:
    mean = torch.tensor(mean, dtype=img.dtype).view(-1, 1, 1)
    std = torch.tensor(std, dtype=img.dtype).view(-1, 1, 1)
    return (img - mean) / std


def eval_images(source, img_size: int, mean, std, indices=None) -> tuple[Tensor, Tensor]:
    """Un-augmented images (resized, normalised) [N, C, S, S] and labels [N], e.g. for probing."""
    idx = range(len(source)) if indices is None else indices
    imgs, labels = [], []
    for i in idx:
        img = source.load(i)
        if img is not None:
            imgs.append(normalize(_resize(img, img_size), mean, std))
            labels.append(source.label(i))
    return torch.stack(imgs), torch.tensor(labels)


# --------------------------------------------------------------------------------------------
# Deterministic per-rank sharding and the resumable batch stream
# --------------------------------------------------------------------------------------------
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One 63-bit seed per (run seed, epoch, sample): independent of rank, worker and resume."""
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (2**63)


class AugmentedDataset(torch.utils.data.Dataset):
    """Items are keyed by (epoch, index); returns (image, label) or None for an unreadable image."""

    def __init__(self, source, augment: Augment, seed: int):
        self.source, self.augment, self.seed = source, augment, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        epoch, index = key
        img = self.source.load(index)
        if img is None:
            return None
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        return self.augment(img, g), self.source.label(index)


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


def batch_stream(dataset: AugmentedDataset, batches: ShardedBatches, start: int, workers: int,
                 pin_memory: bool):
    """Yield (images, labels, skipped) forever, starting at micro-batch ``start`` of the run."""
    epoch, offset = divmod(start, batches.per_epoch)
    while True:
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches.epoch(epoch)[offset:], num_workers=workers,
            collate_fn=collate, pin_memory=pin_memory)
        yield from loader
        epoch, offset = epoch + 1, 0
