"""Triton backend of :func:`patch_targets` and the fused :func:`patch_loss` (see ``targets.py``).

Registered with ``torch.library`` as ``randsac_fast::patch_targets_triton`` and
``randsac_fast::patch_loss_triton`` (+ its backward op), so ``torch.compile`` and FSDP2 see
ordinary ops with fake-tensor shapes. The loss never holds a target tensor: the forward kernel
forms each target row, reduces it against ``pred`` to one number per row, and the backward
kernel forms the row again to write ``dpred``.

Inputs arrive validated by the public ops. Images may have any strides; ``pred`` is made
contiguous.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..kernels import triton_targets as kern  # ImportError (-> BackendUnavailable) without triton
from ._dispatch import interpreting

_NUM_WARPS = 4


def check_device(op: str, *tensors: Tensor) -> None:
    """Triton runs CUDA tensors, or CPU tensors under the interpreter (tests only)."""
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not interpreting():
            raise ValueError(f"{op}: backend 'triton' needs CUDA tensors; got a {t.device} tensor. Move the "
                             f"inputs to a GPU, use backend='reference', or set TRITON_INTERPRET=1 before "
                             f"importing triton to run the kernels on the CPU (slow; for tests)")


@functools.lru_cache(maxsize=64)
def _taps(blur_kernel: int, blur_sigma: float, device: torch.device) -> Tensor:
    """1-D Gaussian taps [k] fp32: SAIM's 2-D kernel (sum 1) is their outer product, so its row
    sums are the taps. Computed in float64 from the reference definition."""
    if blur_kernel <= 1:
        return torch.ones(1, dtype=torch.float32, device=device)  # unused placeholder pointer
    return reference.gaussian_kernel2d(blur_kernel, blur_sigma).sum(dim=1).float().to(device)


def _launch(kernel, images: Tensor, patch_size: int, n_rows: int, blur_kernel: int, norm_pix: bool,
            pointers: tuple, **constexprs) -> None:
    """Launch one of the row kernels over a (N', B) grid: ``pointers`` first, then the image geometry."""
    b, c, h, w = images.shape
    if b == 0 or n_rows == 0:
        return
    bp, bc, br = kern.block_sizes(patch_size, c, blur_kernel)
    kernel[(n_rows, b)](*pointers, n_rows, c, h, w, w // patch_size, *images.stride(), reference.NORM_PIX_EPS,
                        P=patch_size, K=blur_kernel if blur_kernel > 1 else 0, NORM=norm_pix,
                        BP=bp, BC=bc, BR=br, num_warps=_NUM_WARPS, **constexprs)


# ---------------------------------------------------------------------------------------------
# patch_targets
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("randsac_fast::patch_targets_triton", mutates_args=())
def _targets_op(images: Tensor, perm: Optional[Tensor], patch_size: int, blur_kernel: int,
                blur_sigma: float, norm_pix: bool) -> Tensor:
    b, c, h, w = images.shape
    n_rows = perm.shape[1] if perm is not None else (h // patch_size) * (w // patch_size)
    out = torch.empty(b, n_rows, patch_size * patch_size * c, dtype=torch.float32, device=images.device)
    perm_arg = perm.contiguous() if perm is not None else out  # placeholder pointer, never read
    taps = _taps(blur_kernel, blur_sigma, images.device)
    _launch(kern.patch_targets_kernel, images, patch_size, n_rows, blur_kernel, norm_pix,
            (images, perm_arg, taps, out), HAS_PERM=perm is not None)
    return out


@_targets_op.register_fake
def _(images, perm, patch_size, blur_kernel, blur_sigma, norm_pix):
    b, c, h, w = images.shape
    n_rows = perm.shape[1] if perm is not None else (h // patch_size) * (w // patch_size)
    return images.new_empty(b, n_rows, patch_size * patch_size * c, dtype=torch.float32)


def patch_targets_triton(images: Tensor, patch_size: int, blur_kernel: int, blur_sigma: float,
                         norm_pix: bool, perm: Tensor | None) -> Tensor:
    """images [B, C, H, W] -> float32 targets [B, N', P*P*C] (see ``targets.patch_targets``)."""
    check_device("patch_targets", images)
    return _targets_op(images, perm, patch_size, blur_kernel, blur_sigma, norm_pix)


# ---------------------------------------------------------------------------------------------
# patch_loss: forward gives per-row error sums, the mean is a small deterministic torch reduction
# ---------------------------------------------------------------------------------------------
def _n_valid(valid: Tensor | None, pred: Tensor) -> Tensor | int:
    """Number of rows that count, at least 1 (a device scalar when it depends on data: no sync)."""
    if valid is None:
        return max(pred.shape[0] * pred.shape[1], 1)
    return valid.sum(dtype=torch.float32).clamp(min=1)


def _valid_arg(valid: Tensor | None, fallback: Tensor) -> Tensor:
    return valid.contiguous().view(torch.uint8) if valid is not None else fallback


@torch.library.custom_op("randsac_fast::patch_loss_triton", mutates_args=())
def _loss_op(pred: Tensor, images: Tensor, perm: Tensor, valid: Optional[Tensor], patch_size: int,
             blur_kernel: int, blur_sigma: float, norm_pix: bool, loss: str) -> Tensor:
    pred = pred.contiguous()
    b, n_rows, k = pred.shape
    row_err = torch.zeros(b, n_rows, dtype=torch.float32, device=pred.device)
    taps = _taps(blur_kernel, blur_sigma, images.device)
    _launch(kern.patch_loss_fwd_kernel, images, patch_size, n_rows, blur_kernel, norm_pix,
            (pred, images, perm.contiguous(), _valid_arg(valid, row_err), taps, row_err),
            L1=loss == "l1", HAS_VALID=valid is not None)
    return row_err.sum() / (_n_valid(valid, pred) * k)


@_loss_op.register_fake
def _(pred, images, perm, valid, patch_size, blur_kernel, blur_sigma, norm_pix, loss):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("randsac_fast::patch_loss_triton_backward", mutates_args=())
def _loss_backward_op(grad: Tensor, pred: Tensor, images: Tensor, perm: Tensor, valid: Optional[Tensor],
                      patch_size: int, blur_kernel: int, blur_sigma: float, norm_pix: bool, loss: str) -> Tensor:
    pred = pred.contiguous()
    b, n_rows, k = pred.shape
    dpred = torch.empty_like(pred)
    coef = (grad.float() / (_n_valid(valid, pred) * k)).reshape(1)
    taps = _taps(blur_kernel, blur_sigma, images.device)
    _launch(kern.patch_loss_bwd_kernel, images, patch_size, n_rows, blur_kernel, norm_pix,
            (pred, images, perm.contiguous(), _valid_arg(valid, dpred), taps, coef, dpred),
            L1=loss == "l1", HAS_VALID=valid is not None)
    return dpred


@_loss_backward_op.register_fake
def _(grad, pred, images, perm, valid, patch_size, blur_kernel, blur_sigma, norm_pix, loss):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _loss_setup_context(ctx, inputs, output):
    pred, images, perm, valid, *ctx.static = inputs
    ctx.save_for_backward(pred, images, perm, valid)


def _loss_backward(ctx, grad):
    pred, images, perm, valid = ctx.saved_tensors
    dpred = _loss_backward_op(grad, pred, images, perm, valid, *ctx.static) if ctx.needs_input_grad[0] else None
    return dpred, None, None, None, None, None, None, None, None


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


def patch_loss_triton(pred: Tensor, images: Tensor, patch_size: int, perm: Tensor, valid: Tensor | None,
                      blur_kernel: int, blur_sigma: float, norm_pix: bool, loss: str) -> Tensor:
    """Scalar float32 loss of pred [B, N', P*P*C] against targets formed on the fly (see
    ``targets.patch_loss``); differentiable w.r.t. pred."""
    check_device("patch_loss", pred, images)
    if pred.device != images.device:
        raise ValueError(f"pred is on {pred.device} but images are on {images.device}; move both to one device")
    return _loss_op(pred, images, perm, valid, patch_size, blur_kernel, blur_sigma, norm_pix, loss)
