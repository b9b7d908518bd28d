"""Triton backend of :func:`skip_memory` (see ``skip.py``), registered with ``torch.library`` as
``randsac_fast::skip_memory_triton`` with a one-pass backward op producing dH and dW together.

hidden: the Lenc encoder states, each [B, N, D] (made contiguous; a list, so the model never
stacks them into one [Lenc, B, N, D] copy), weight: [Ldec, Lenc] -> [Ldec, B, N, D] in hidden's
dtype; accumulation is fp32 with the weight kept in its own precision. dW comes back in weight's
dtype and is bitwise reproducible (fixed-order reduction of per-program partial sums).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..kernels import triton_skip as kern  # ImportError (-> BackendUnavailable) without triton
from .targets_triton import check_device

def _pow2(n: int) -> int:
    return kern.triton.next_power_of_2(max(n, 1))


@torch.library.custom_op("randsac_fast::skip_memory_triton", mutates_args=())
def _skip_op(hidden: list[Tensor], weight: Tensor) -> Tensor:
    hidden, weight = tuple(h.contiguous() for h in hidden), weight.contiguous()
    lenc, ldec = len(hidden), weight.shape[0]
    out = hidden[0].new_empty(ldec, *hidden[0].shape)
    m = hidden[0].numel()                        # B*N*D: one state, flattened
    if m and ldec:
        grid = (kern.num_blocks(m),)
        kern.skip_fwd_kernel[grid](hidden, weight, out, m, ldec, LENC=lenc, LD=_pow2(ldec), BLOCK=kern.BLOCK,
                                   num_warps=kern.NUM_WARPS)
    return out


@_skip_op.register_fake
def _(hidden, weight):
    return hidden[0].new_empty(weight.shape[0], *hidden[0].shape)


@torch.library.custom_op("randsac_fast::skip_memory_triton_backward", mutates_args=())
def _skip_backward_op(grad: Tensor, hidden: list[Tensor], weight: Tensor) -> tuple[list[Tensor], Tensor]:
    grad, weight = grad.contiguous(), weight.contiguous()
    hidden = tuple(h.contiguous() for h in hidden)
    lenc, ldec = len(hidden), weight.shape[0]
    m = hidden[0].numel()                        # B*N*D: one state, flattened
    d_hidden = [torch.empty_like(h) for h in hidden]   # one tensor per state: no [Lenc, ...] buffer to split
    n_blocks = kern.num_blocks(m)
    programs = max(min(n_blocks, kern.MAX_BWD_PROGRAMS), 1)
    ld, lk = _pow2(ldec), _pow2(lenc)
    partial = torch.zeros(programs, ld, lk, dtype=torch.float32, device=weight.device)
    if m and lenc:
        kern.skip_bwd_kernel[(programs,)](grad, hidden, weight, tuple(d_hidden), partial, m, ldec, n_blocks,
                                          LENC=lenc, LD=ld, LK=lk, BLOCK=kern.BLOCK, num_warps=kern.NUM_WARPS)
    d_weight = partial.sum(dim=0)[:ldec, :lenc].to(weight.dtype).contiguous()
    return d_hidden, d_weight


@_skip_backward_op.register_fake
def _(grad, hidden, weight):
    return ([torch.empty_like(h, memory_format=torch.contiguous_format) for h in hidden],
            torch.empty_like(weight, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    hidden, weight = inputs
    ctx.save_for_backward(*hidden, weight)


def _backward(ctx, grad):
    *hidden, weight = ctx.saved_tensors
    return _skip_backward_op(grad, hidden, weight)


_skip_op.register_autograd(_backward, setup_context=_setup_context)


def skip_memory_triton(hidden: Tensor | Sequence[Tensor], weight: Tensor) -> Tensor:
    """Z[l] = sum_k weight[l, k] hidden[k]: Lenc states [B, N, D] (a list, or stacked as
    [Lenc, B, N, D]), [Ldec, Lenc] -> [Ldec, B, N, D]."""
    hidden = list(hidden.unbind(0)) if isinstance(hidden, Tensor) else list(hidden)
    check_device("skip_memory", *hidden, weight)
    return _skip_op(hidden, weight)
