"""``patch_targets`` (blur -> patchify -> norm-pix -> gather) and the fused ``patch_loss``.

Contract: images [B, C, H, W] (fp32 / bf16 / fp16), H and W multiples of ``patch_size``;
targets are float32 [B, N, P*P*C], pixel order (p, q, c), rows gathered by ``perm`` [B, N'] (int64
raster indices) when given. Blur: SAIM's k x k Gaussian (sum 1, zero padding k//2), k odd, 0 = off.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from . import _validate, cases
from ._dispatch import checks_enabled, lazy, register, resolve


def _targets_torch(images, patch_size, blur_kernel, blur_sigma, norm_pix, perm):
    x = images.float() if images.dtype != torch.float64 else images
    return reference.patch_targets(x, patch_size, blur_kernel=blur_kernel, blur_sigma=blur_sigma,
                                   norm_pix=norm_pix, perm=perm)


def _loss_torch(pred, images, patch_size, perm, valid, blur_kernel, blur_sigma, norm_pix, loss):
    target = _targets_torch(images, patch_size, blur_kernel, blur_sigma, norm_pix, perm)
    return masked_patch_loss(pred, target, valid, loss)


_TARGETS = {
    "reference": lambda: _targets_torch,
    "triton": lazy("ops.targets_triton", "patch_targets_triton"),
}
_LOSS = {
    "reference": lambda: _loss_torch,
    "triton": lazy("ops.targets_triton", "patch_loss_triton"),
}
register("patch_targets", _TARGETS, fast=("triton",), fallback=("reference",), check=cases.targets_check, timing=cases.targets_timing)
register("patch_loss", _LOSS, fast=("triton",), fallback=("reference",), check=cases.loss_check, timing=cases.loss_timing)


def masked_patch_loss(pred: Tensor, target: Tensor, valid: Tensor | None, loss: str) -> Tensor:
    """Mean of (pred - target)^2 (``mse``) or |pred - target| (``l1``) over the valid rows.

    pred, target: [B, N', K]; valid: [B, N'] bool or None (all rows valid).
    """
    diff = pred.float() - target.float() if pred.dtype != torch.float64 else pred - target.to(pred.dtype)
    err = diff.square() if loss == "mse" else diff.abs()
    err = err.mean(dim=-1)
    if valid is None:
        return err.mean()
    return (err * valid).sum() / valid.sum().clamp(min=1)


def validate_images(images: Tensor, patch_size: int, blur_kernel: int, blur_sigma: float) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a 4-D tensor [B, C, H, W]; got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point (fp32, bf16, fp16); got {images.dtype}")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int; got {patch_size!r}")
    h, w = images.shape[-2:]
    for side, size in (("height", h), ("width", w)):
        if size % patch_size:
            raise ValueError(f"image {side} {size} is not divisible by patch size {patch_size}; "
                             f"resize or crop to a multiple of {patch_size}")
    if blur_kernel not in (0, 1) and (blur_kernel < 0 or blur_kernel % 2 == 0):
        raise ValueError(f"blur_kernel must be 0 (no blur) or an odd size >= 3; got {blur_kernel}")


def validate_perm(perm: Tensor, batch: int, num_tokens: int, device) -> None:
    if perm.dtype != torch.int64 or perm.dim() != 2 or perm.shape[0] != batch:
        raise ValueError(f"perm must be int64 [B, N'] with B={batch}; got {perm.dtype} {tuple(perm.shape)}")
    if perm.device != device:
        raise ValueError(f"perm is on {perm.device} but images are on {device}")
    if checks_enabled(None) and perm.numel() and bool(((perm < 0) | (perm >= num_tokens)).any()):
        raise ValueError(f"perm holds token indices outside [0, {num_tokens}): "
                         f"min {int(perm.min())}, max {int(perm.max())}")


def patch_targets(images: Tensor, patch_size: int, *, blur_kernel: int = 0, blur_sigma: float = 1.0,
                  norm_pix: bool = True, perm: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Regression targets, float32 [B, N, P*P*C] (or [B, N', ...] gathered by ``perm``)."""
    validate_images(images, patch_size, blur_kernel, blur_sigma)
    norm_pix = _validate.target_args(images, patch_size, blur_kernel, blur_sigma, norm_pix)
    b, _, h, w = images.shape
    if perm is not None:
        validate_perm(perm, b, (h // patch_size) * (w // patch_size), images.device)
    fn = resolve("patch_targets", backend, _TARGETS, images.device,
                 dtype=images.dtype, structure=(images.shape[1], patch_size, int(blur_kernel), bool(norm_pix),
                                                perm is not None),
                 shape=(b, h, w, perm.shape[1] if perm is not None else 0))
    return fn(images, patch_size, int(blur_kernel), float(blur_sigma), bool(norm_pix), perm)


def patch_loss(pred: Tensor, images: Tensor, patch_size: int, perm: Tensor, valid: Tensor | None = None, *,
               blur_kernel: int = 0, blur_sigma: float = 1.0, norm_pix: bool = True, loss: str = "mse",
               backend: str = "auto") -> Tensor:
    """Scalar loss of predictions against targets formed on the fly.

    pred: [B, N', P*P*C] rows in the order given by ``perm`` [B, N'] (raster token index of each
    row); valid: [B, N'] bool, rows that count (padding rows False), None = all. Returns the mean
    over valid rows and pixels of the squared (``mse``) or absolute (``l1``) error. Differentiable
    w.r.t. ``pred``.
    """
    validate_images(images, patch_size, blur_kernel, blur_sigma)
    norm_pix = _validate.target_args(images, patch_size, blur_kernel, blur_sigma, norm_pix)
    if loss not in ("mse", "l1"):
        raise ValueError(f"loss must be 'mse' or 'l1'; got {loss!r}")
    b, c, h, w = images.shape
    validate_perm(perm, b, (h // patch_size) * (w // patch_size), images.device)
    k = patch_size * patch_size * c
    if pred.device != images.device:
        raise ValueError(f"pred is on {pred.device} but images are on {images.device}; move both to one device")
    if pred.dim() != 3 or pred.shape[0] != b or pred.shape[1] != perm.shape[1] or pred.shape[2] != k:
        raise ValueError(f"pred must be [B, N', P*P*C] = [{b}, {perm.shape[1]}, {k}]; got {tuple(pred.shape)}")
    if valid is not None and (valid.dtype != torch.bool or valid.shape != perm.shape):
        raise ValueError(f"valid must be a bool tensor shaped like perm {tuple(perm.shape)}; got "
                         f"{valid.dtype} {tuple(valid.shape)}")
    fn = resolve("patch_loss", backend, _LOSS, images.device,
                 dtype=pred.dtype, structure=(c, patch_size, int(blur_kernel), bool(norm_pix), loss, valid is not None,
                                              str(images.dtype).removeprefix("torch.")),
                 shape=(b, h, w, perm.shape[1]))
    return fn(pred, images, patch_size, perm, valid, int(blur_kernel), float(blur_sigma), bool(norm_pix), loss)
