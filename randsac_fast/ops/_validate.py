"""Argument checks shared by the public ops: one error line that names the value and the fix.

Two kinds of check live here:

* argument checks (types, ranges): free, always on. A string ``inclusive="False"`` would be
  truthy and silently pick the other mask; ``scale=True`` would be 1.0; ``scale=inf`` gives
  NaN rows. These are refused.
* data checks (NaN / Inf in the tensors): each costs a device->host sync, so they run only while
  the ops' check switch is on (:func:`randsac_fast.ops.set_checks`; the trainer turns it off
  after its first step) and never under ``torch.compile``.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .. import reference
from ._dispatch import checks_enabled


def flag(value, name: str) -> bool:
    """``value`` must be a real bool (a string such as "False" is truthy, so it is refused)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, Tensor) and value.dtype == torch.bool and value.numel() == 1:
        return bool(value)
    raise TypeError(f"{name} must be True or False; got {value!r} ({type(value).__name__}) — pass a bool")


def positive_number(value, name: str, *, optional: bool = False, default: str = "") -> float | None:
    """A finite real number > 0 (bools refused: True would silently be 1.0)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        none = f" or None{default}" if optional else ""
        raise ValueError(f"{name} must be a finite number > 0{none}; got {value!r}")
    return float(value)


def integer(value, name: str, *, minimum: int) -> int:
    """An int >= minimum (bools refused: True would silently be 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def with_data(t, name: str) -> None:
    """``t`` holds values: not a meta tensor (shapes only), which no backend can compute with."""
    if isinstance(t, Tensor) and t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (a shape without values); pass a tensor on cpu or cuda "
                         "(e.g. build the model, then .to_empty(device=...) and load weights)")


def _where_bad(t: Tensor) -> str:
    """'NaN at index (0, 1, 3, 2)' for the first non-finite element (one sync; only on error)."""
    bad = ~torch.isfinite(t)
    idx = tuple(int(i) for i in bad.nonzero()[0])
    val = t[idx].item()
    return f"{'NaN' if math.isnan(val) else val} at index {idx}"


def finite(t: Tensor, name: str, fix: str, where: Tensor | None = None, check: bool | None = None) -> None:
    """When data checks are on (``check`` overrides the global switch): ``t`` — or the elements
    that the bool ``where`` (broadcastable to ``t``) selects — holds no NaN / Inf."""
    if not checks_enabled(check) or t.numel() == 0 or not t.is_floating_point():
        return
    ok = torch.isfinite(t)
    if where is not None:
        ok = ok | ~where
    if not bool(ok.all()):
        shown = t if where is None else torch.where(where, t, torch.zeros((), dtype=t.dtype, device=t.device))
        raise ValueError(f"{name} holds {_where_bad(shown)}; {fix}")


_UPSTREAM = "the inputs are broken upstream (diverged weights, bad data): fix them, or lower the learning rate"


def attention_args(q: Tensor, k: Tensor, v: Tensor, seg_q: Tensor, seg_k: Tensor, inclusive, scale,
                   check: bool | None) -> tuple[bool, float | None]:
    """``segment_attention``'s scalar arguments, and its data when checks are on: q finite, k and v
    finite wherever some query sees them. Keys that no query sees (right padding with a sentinel
    segment) may hold anything: every backend guarantees that they change no output or gradient.
    Returns (inclusive, scale) as bool and float-or-None."""
    inclusive = flag(inclusive, "inclusive")
    scale = positive_number(scale, "scale", optional=True, default=" (1/sqrt(D))")
    if checks_enabled(check) and k.numel():
        seen = reference.seen_keys(seg_q, seg_k, inclusive)[:, None, :, None]      # [B, 1, Nk, 1]
        finite(q, "q", _UPSTREAM, check=check)
        finite(k, "k (at a key some query sees)", _UPSTREAM, seen, check)
        finite(v, "v (at a key some query sees)", _UPSTREAM, seen, check)
    return inclusive, scale


def target_args(images: Tensor, patch_size, blur_kernel, blur_sigma, norm_pix) -> bool:
    """``patch_targets`` / ``patch_loss``'s scalar arguments, and the images when checks are on.
    Returns norm_pix as a bool. (Tensor shapes and layouts are checked by the ops themselves.)"""
    with_data(images, "images")
    integer(patch_size, "patch_size", minimum=1)
    integer(blur_kernel, "blur_kernel", minimum=0)
    norm_pix = flag(norm_pix, "norm_pix")
    if blur_kernel > 1:
        positive_number(blur_sigma, "blur_sigma")
    if norm_pix and images.dim() == 4 and patch_size * patch_size * images.shape[1] < 2:
        raise ValueError(f"norm_pix normalises each patch by its own mean and unbiased variance, which needs at "
                         f"least 2 values; a {patch_size}x{patch_size} patch of {images.shape[1]} channel(s) has "
                         f"{patch_size * patch_size * images.shape[1]} — use norm_pix=False or a larger patch")
    if images.is_floating_point():
        finite(images, "images", "the data holds NaN / Inf pixels: fix the data source or its normalisation "
                                 "(a std of 0?)")
    return norm_pix


def skip_args(hidden: list[Tensor], weight: Tensor) -> None:
    """``skip_memory``'s data when checks are on (hidden: the Lenc states)."""
    for k, h in enumerate(hidden):
        finite(h, f"hidden[{k}]", _UPSTREAM)
    finite(weight, "weight", _UPSTREAM)
