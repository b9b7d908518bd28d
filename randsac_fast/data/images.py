"""Encoded images: read the size from the header, decode later in uint8 at the resolution a crop needs.

A transform draws its crop box from the full-resolution size first, then asks for the pixels of that
box only as finely as the output needs: a JPEG is decoded with DCT-domain downscaling by 1/2, 1/4 or
1/8 when the crop, reduced by that factor, is still at least the output size (so the final resize
only ever shrinks, as it would from the full image).

Decoders: ``simplejpeg`` (libjpeg-turbo straight into a packed RGB numpy array) when installed, else
Pillow (also libjpeg-turbo, but it decodes into 4-byte pixels and needs a copy to packed RGB). The
choice is by measurement (``benchmarks/bench_data.py``); ``RANDSAC_FAST_JPEG=pillow`` forces Pillow.
Both use the accurate integer IDCT and fancy chroma upsampling, i.e. the same pixels torchvision's
PIL loader sees. Non-JPEG files (PNG, WebP, ...) go through Pillow at full size.
"""
from __future__ import annotations

import functools
import io
import os
import warnings

import numpy as np
import torch
from torch import Tensor

__all__ = ["DataError", "UnreadableImage", "EncodedImage", "jpeg_decoder", "dct_factor"]

_JPEG_MAGIC = b"\xff\xd8\xff"


class DataError(ValueError):
    """The data cannot be used as given (missing or empty directory, unknown layout)."""


class UnreadableImage(DataError):
    """One image cannot be decoded (truncated, not an image): the loaders skip it and count it."""


def jpeg_decoder() -> str:
    """``simplejpeg`` when importable (and not overridden by RANDSAC_FAST_JPEG=pillow), else ``pillow``."""
    if os.environ.get("RANDSAC_FAST_JPEG", "").lower() == "pillow":
        return "pillow"
    return "simplejpeg" if _have_simplejpeg() else "pillow"


@functools.lru_cache(maxsize=1)
def _have_simplejpeg() -> bool:
    try:
        import simplejpeg  # noqa: F401
        return True
    except ImportError:
        return False


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("image files need Pillow, a dependency of randsac_fast that is missing here: "
                          "pip install pillow") from None
    return Image


def dct_factor(crop_h: int, crop_w: int, out: int) -> int:
    """The largest JPEG reduction 1, 2, 4 or 8 that keeps the reduced crop at least ``out`` pixels on
    both sides (the final resize then only shrinks)."""
    for f in (8, 4, 2):
        if crop_h // f >= out and crop_w // f >= out:
            return f
    return 1


def rgb_uint8(im) -> np.ndarray:
    """A Pillow image -> uint8 [h, w, 3].

    Pillow's ``convert("RGB")`` clips 16-bit grey images (modes I;16*, and I as PNG opens them) at
    255, i.e. near-white; they are scaled by their bit depth here instead (65535 -> 255)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im).astype(np.float32)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"{im.mode} image values span {arr.min():g}..{arr.max():g}, outside 16-bit 0..65535")
        grey = np.rint(arr * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if im.mode == "F":
        raise ValueError("floating-point (mode F) images have no agreed value range; convert them to 8- or 16-bit")
    return np.asarray(im.convert("RGB"))


def decode_rgb(im) -> Tensor:
    """A Pillow image -> float [3, H, W] in [0, 1] (16-bit images scaled by their depth)."""
    return torch.from_numpy(rgb_uint8(im).copy()).permute(2, 0, 1).float().div_(255.0)


class EncodedImage:
    """A file's bytes and its size; pixels are decoded on :meth:`crop`. ``name`` is used in messages."""

    def __init__(self, data: bytes, name: str):
        self.data, self.name = data, name
        self.is_jpeg = data[:3] == _JPEG_MAGIC
        self.decoder = jpeg_decoder() if self.is_jpeg else "pillow"
        try:
            if self.decoder == "simplejpeg":
                import simplejpeg
                self.height, self.width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
                if colorspace not in ("YCbCr", "Gray", "RGB"):   # CMYK / YCCK: Pillow converts those
                    self.decoder = "pillow"
            else:
                with _pil().open(io.BytesIO(data)) as im:
                    self.width, self.height = im.size
                    if im.mode == "F":
                        raise ValueError("floating-point (mode F) images have no agreed value range; "
                                         "convert them to 8- or 16-bit")
        except ImportError:
            raise
        except Exception as e:
            raise UnreadableImage(f"skipping unreadable image {name}: {e}") from None

    @classmethod
    def read(cls, path: str) -> "EncodedImage":
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as e:
            raise UnreadableImage(f"skipping unreadable image {path}: {e}") from None
        return cls(data, path)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.height, self.width)

    def decode(self, factor: int = 1) -> np.ndarray:
        """uint8 [h, w, 3], reduced by ``factor`` in the DCT domain when the file is a JPEG."""
        try:
            if self.decoder == "simplejpeg":
                import simplejpeg
                try:
                    return simplejpeg.decode_jpeg(self.data, colorspace="RGB", min_factor=factor,
                                                  min_height=-(-self.height // factor),
                                                  min_width=-(-self.width // factor))
                except ValueError:
                    pass        # let Pillow try (and name the failure if it fails too)
            with _pil().open(io.BytesIO(self.data)) as im:
                if factor > 1 and self.is_jpeg:
                    im.draft("RGB", (self.width // factor, self.height // factor))
                return rgb_uint8(im)
        except ImportError:
            raise
        except Exception as e:
            raise UnreadableImage(f"skipping unreadable image {self.name}: {e}") from None

    def crop(self, top: int, left: int, height: int, width: int, out: int) -> Tensor:
        """uint8 [3, h, w]: the box (full-resolution pixels) at the coarsest JPEG scale that keeps it
        at least ``out`` pixels on each side; a box on a reduced decode is rounded to its pixel grid."""
        factor = dct_factor(height, width, out) if self.is_jpeg else 1
        arr = self.decode(factor)
        sy, sx = arr.shape[0] / self.height, arr.shape[1] / self.width
        if (sy, sx) != (1.0, 1.0):
            top, left = round(top * sy), round(left * sx)
            height = max(1, min(round(height * sy), arr.shape[0] - top))
            width = max(1, min(round(width * sx), arr.shape[1] - left))
        return _chw(arr[top:top + height, left:left + width])

    def full(self) -> Tensor:
        """uint8 [3, H, W]: the whole image at full resolution."""
        return _chw(self.decode(1))


def _chw(arr: np.ndarray) -> Tensor:
    """[h, w, 3] uint8 array -> a [3, h, w] view (Pillow's arrays are read-only; they are only read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr).permute(2, 0, 1)
