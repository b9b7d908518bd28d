"""MAE augmentation: RandomResizedCrop (scale, ratio, torchvision's fallback) + horizontal flip, bicubic.

One path for every input kind: the crop box is drawn from the image size, only the box is resized
(bicubic with antialiasing, as Pillow / torchvision do), and only the small result is flipped and
converted. uint8 inputs (decoded files) stay uint8 through the resize; an :class:`EncodedImage` is
decoded only as finely as its box needs (JPEG DCT downscaling, ``images.py``). With
``normalize=False`` the result stays uint8 and the trainer normalises on the device (4x fewer bytes
to copy, no float work in the loader).

Every random choice comes from a generator seeded by (seed, epoch, index) (:func:`sample_seed`), so a
sample's crop does not depend on which worker or rank loads it, nor on whether the run was resumed.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .images import EncodedImage, UnreadableImage

__all__ = ["Augment", "crop_box", "resize", "normalize", "eval_images", "sample_seed", "augment_sample"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One 63-bit seed per (run seed, epoch, sample): independent of rank, worker and resume."""
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (2**63)


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


def resize(img: Tensor, size: int) -> Tensor:
    """[C, h, w] -> [C, size, size], bicubic, antialiased when shrinking; uint8 stays uint8 (rounded
    and clamped like Pillow), float stays float. Any strides (a crop of an [h, w, C] array is fine)."""
    shrink = bool(img.shape[-1] > size or img.shape[-2] > size)
    return F.interpolate(img[None], size=(size, size), mode="bicubic", align_corners=False,
                         antialias=shrink)[0]


def normalize(img: Tensor, mean, std) -> Tensor:
    """(img - mean) / std per channel, float32; uint8 input counts 255 as 1.0. [..., C, H, W]."""
    x = img.float()
    if img.dtype == torch.uint8:
        x = x.div_(255.0)
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


@dataclass
class Augment:
    """Per-sample MAE augmentation; ``__call__(img, g)`` -> [C, img_size, img_size], normalised float
    (``normalize=True``) or the crop in its input's kind (uint8 for files, float for in-memory sets).

    ``img``: float [C, H, W] in [0, 1], uint8 [C, H, W], or an :class:`EncodedImage`.
    """
    img_size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalize: bool = True

    def __call__(self, img, g: torch.Generator) -> Tensor:
        encoded = isinstance(img, EncodedImage)
        h, w = (img.height, img.width) if encoded else img.shape[-2:]
        top, left, ch, cw = crop_box(h, w, self.scale, self.ratio, g)
        crop = (img.crop(top, left, ch, cw, self.img_size) if encoded
                else img[:, top:top + ch, left:left + cw])
        out = resize(crop, self.img_size)
        if self.hflip and bool(torch.rand(1, generator=g) < 0.5):
            out = out.flip(-1)
        return normalize(out, self.mean, self.std) if self.normalize else out.contiguous()


def augment_sample(augment, img, seed: int, epoch: int, index: int) -> Tensor | None:
    """``augment(img, g)`` with g seeded by (seed, epoch, index); None (with a warning naming the
    file) when the image cannot be decoded."""
    if img is None:
        return None
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, index))
    try:
        return augment(img, g)
    except UnreadableImage as e:
        warnings.warn(str(e), stacklevel=2)
        return None


def eval_images(source, img_size: int, mean, std, indices=None) -> tuple[Tensor, Tensor]:
    """Un-augmented images (whole image resized, normalised) [N, C, S, S] and labels [N], e.g. for probing."""
    idx = range(len(source)) if indices is None else indices
    imgs, labels = [], []
    for i in idx:
        img = source.load(i)
        if isinstance(img, EncodedImage):
            try:
                img = img.full()
            except UnreadableImage as e:
                warnings.warn(str(e), stacklevel=2)
                img = None
        if img is not None:
            imgs.append(normalize(resize(img, img_size), mean, std))
            labels.append(source.label(i))
    return torch.stack(imgs), torch.tensor(labels)
