"""``skip_memory``: RandSAC's trainable skip connections, Z_l = sum_k W[l, k] H_k.

hidden: the Lenc encoder layer outputs, a sequence of [B, N, D] tensors (what the model holds:
nothing is stacked) or one stacked [Lenc, B, N, D] tensor; weight: [Ldec, Lenc]
-> [Ldec, B, N, D] in hidden's dtype. Differentiable w.r.t. both.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .. import reference
from . import _validate, cases
from ._dispatch import lazy, register, resolve

_TABLE = {
    "reference": lambda: reference.skip_memory,
    "triton": lazy("ops.skip_triton", "skip_memory_triton"),
}
register("skip_memory", _TABLE, fast=("triton",), fallback=("reference",), check=cases.skip_check, timing=cases.skip_timing)


def skip_memory(hidden: Tensor | Sequence[Tensor], weight: Tensor, *, backend: str = "auto") -> Tensor:
    if isinstance(hidden, Tensor):
        if hidden.dim() != 4:
            raise ValueError(f"hidden must be [Lenc, B, N, D] (or a list of Lenc [B, N, D] tensors); "
                             f"got shape {tuple(hidden.shape)}")
        states = list(hidden.unbind(0))
    else:
        states = list(hidden)
        shapes = {tuple(h.shape) for h in states}
        if not states or len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise ValueError(f"hidden must be a non-empty list of [B, N, D] tensors of one shape; got shapes "
                             f"{[tuple(h.shape) for h in states]}")
        dtypes, devices = {h.dtype for h in states}, {h.device for h in states}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"the hidden states must share one dtype and device; got {sorted(map(str, dtypes))} "
                             f"on {sorted(map(str, devices))}")
    first = states[0]
    if weight.dim() != 2 or weight.shape[1] != len(states):
        raise ValueError(f"weight must be [Ldec, Lenc] with Lenc = {len(states)}; got {tuple(weight.shape)}")
    if weight.device != first.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {first.device}")
    if not first.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"hidden and weight must be floating point; got {first.dtype}, {weight.dtype}")
    _validate.with_data(first, "hidden")
    _validate.with_data(weight, "weight")
    _validate.skip_args(states, weight)
    b, n, d = first.shape
    fn = resolve("skip_memory", backend, _TABLE, first.device,
                 dtype=first.dtype, structure=(len(states), weight.shape[0], d, str(weight.dtype).removeprefix("torch.")),
                 shape=(b, n))
    return fn(hidden if isinstance(hidden, Tensor) else states, weight)
