"""``skip_memory``: RandSAC's trainable skip connections, Z_l = sum_k W[l, k] H_k.

hidden: [Lenc, B, N, D] (the encoder layer outputs, stacked), weight: [Ldec, Lenc]
-> [Ldec, B, N, D] in hidden's dtype. Differentiable w.r.t. both.
"""
from __future__ import annotations

from torch import Tensor

from .. import reference
from . import _validate, cases
from ._dispatch import lazy, register, resolve

_TABLE = {
    "reference": lambda: reference.skip_memory,
    "triton": lazy("ops.skip_triton", "skip_memory_triton"),
}
register("skip_memory", _TABLE, fast=("triton",), fallback=("reference",), check=cases.skip_check, timing=cases.skip_timing)


def skip_memory(hidden: Tensor, weight: Tensor, *, backend: str = "auto") -> Tensor:
    if hidden.dim() != 4:
        raise ValueError(f"hidden must be [Lenc, B, N, D]; got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[0]:
        raise ValueError(f"weight must be [Ldec, Lenc] with Lenc = {hidden.shape[0]}; got {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"hidden and weight must be floating point; got {hidden.dtype}, {weight.dtype}")
    _validate.skip_args(hidden, weight)
    lenc, b, n, d = hidden.shape
    fn = resolve("skip_memory", backend, _TABLE, hidden.device,
                 dtype=hidden.dtype, structure=(lenc, weight.shape[0], d, str(weight.dtype).removeprefix("torch.")),
                 shape=(b, n))
    return fn(hidden, weight)
