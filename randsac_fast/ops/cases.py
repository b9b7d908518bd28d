"""The problems ``auto`` verifies and times each op's backends on (see :mod:`._dispatch`).

For each op, two generators of :class:`~.selfcheck.Case` (the positional arguments of the op's
backend implementations, plus which of them are differentiated):

* ``*_check(device, dtype, structure)``: a small random problem with the structure of the call
  (for attention: head dim, inclusive/strict, layout), sized to cross the kernels' tile borders
  and to hold rows that see no key, padding and both segment and token (causal) orders;
* ``*_timing(device, dtype, structure, shape)``: a random problem at the call's shape.

Every generator draws from its own seeded ``torch.Generator``, never from the global RNG. A new
backend signature (or layout) changes only the generator of that op.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .selfcheck import Case


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, gen, device, dtype) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)


def sorted_segments(rows: int, length: int, segments: int, gen: torch.Generator) -> Tensor:
    """[rows, length] int32 non-decreasing segment ids from 0 (about ``segments`` per row)."""
    ids = torch.randint(0, max(1, segments), (rows, length), generator=gen).sort(dim=1).values
    return (ids - ids[:, :1]).to(torch.int32)


# ------------------------------------------------------------------------------ segment_attention

def _attention_inputs(b, h, nq, nk, d, inclusive, layout, seg_q, seg_k, gen, device, dtype) -> Case:
    def operand(n):
        if layout == "contiguous":
            return _randn((b, h, n, d), gen, device, dtype)
        return _randn((b, n, h, d), gen, device, dtype).transpose(1, 2)   # a head view of a [B, N, H*D] projection
    q, k, v = operand(nq), operand(nk), operand(nk)
    return Case((q, k, v, seg_q.to(device), seg_k.to(device), bool(inclusive), d ** -0.5), (0, 1, 2),
                ("out", "dq", "dk", "dv"))


def attention_check(device, dtype, structure) -> Case:
    """structure = (head_dim, inclusive, layout). Three rows: random segments (queries fewer than keys,
    keys right-padded with a sentinel id), plain tokens (SAIM, causal), one segment (all visible)."""
    head_dim, inclusive, layout = structure
    gen = _gen(0)
    # Not tile multiples, several tiles long: GPU tiles are up to 128 wide, the interpreter's 16.
    nq, nk = (200, 232) if device.type == "cuda" else (40, 46)
    seg_k = torch.stack([sorted_segments(1, nk, 9, gen)[0], torch.arange(nk, dtype=torch.int32),
                         torch.zeros(nk, dtype=torch.int32)])
    seg_k[0, -5:] = 1 << 20                           # padding keys: invisible to every query
    seg_q = torch.stack([sorted_segments(1, nq, 9, gen)[0], torch.arange(nq, dtype=torch.int32),
                         torch.zeros(nq, dtype=torch.int32)])
    return _attention_inputs(3, 2, nq, nk, head_dim, inclusive, layout, seg_q, seg_k, gen, device, dtype)


def attention_timing(device, dtype, structure, shape) -> Case:
    """shape = (B, H, Nq, Nk): random segments of about 9 tokens (the cost follows the visible pairs,
    which are near half the square for any sorted order)."""
    head_dim, inclusive, layout = structure
    b, h, nq, nk = shape
    gen = _gen(1)
    seg_k = sorted_segments(b, nk, max(1, nk // 9), gen)
    seg_q = seg_k if nq == nk else sorted_segments(b, nq, max(1, nk // 9), gen)
    return _attention_inputs(b, h, nq, nk, head_dim, inclusive, layout, seg_q, seg_k, gen, device, dtype)


# ------------------------------------------------------------------------------ segment_attention_fused

def _fused_inputs(b, nq, nk, structure, seg_q, seg_k, gen, device, dtype) -> Case:
    """(q_src, kv_src, bounds, num_heads, scale) of the models' layout: self [B, N, 3*H*D] or cross
    q [B, Nq, H*D] + kv [B, Nk, 2*H*D]."""
    from .attention_bounds import segment_bounds
    head_dim, heads, kind, inclusive, causal = structure
    bounds = segment_bounds(seg_q.to(device), seg_k.to(device), bool(inclusive), causal=bool(causal))
    width = heads * head_dim
    if kind == "self":
        return Case((_randn((b, nq, 3 * width), gen, device, dtype), None, bounds, heads, head_dim ** -0.5),
                    (0,), ("out", "dqkv"))
    return Case((_randn((b, nq, width), gen, device, dtype), _randn((b, nk, 2 * width), gen, device, dtype), bounds,
                 heads, head_dim ** -0.5), (0, 1), ("out", "dq", "dkv"))


def fused_attention_check(device, dtype, structure) -> Case:
    """structure = (head_dim, num_heads, kind, inclusive, causal). Causal: plain tokens (SAIM). Else two
    rows of random segments, right-padded with the sentinel id (queries and keys: padded query rows
    must give 0), one row a single segment; not tile multiples, several tiles long."""
    from ..orders import SENTINEL
    head_dim, heads, kind, inclusive, causal = structure
    gen = _gen(2)
    n = 200 if device.type == "cuda" else 40
    nq, nk = (n, n) if kind == "self" else (n - 8, n)
    if causal:
        seg_q = torch.arange(nq, dtype=torch.int32).expand(2, nq).contiguous()
        seg_k = torch.arange(nk, dtype=torch.int32).expand(2, nk).contiguous()
    else:
        seg_k = torch.stack([sorted_segments(1, nk, 9, gen)[0], torch.zeros(nk, dtype=torch.int32)])
        seg_q = seg_k.clone() if kind == "self" else torch.stack([sorted_segments(1, nq, 9, gen)[0] + 1,
                                                                  torch.ones(nq, dtype=torch.int32)])
        seg_k[0, -5:] = SENTINEL
        seg_q[0, -5:] = SENTINEL
    return _fused_inputs(2, nq, nk, structure, seg_q, seg_k, gen, device, dtype)


def fused_attention_timing(device, dtype, structure, shape) -> Case:
    """shape = (B, Nq, Nk): random segments of about 9 tokens (plain tokens when causal)."""
    head_dim, heads, kind, inclusive, causal = structure
    b, nq, nk = shape
    gen = _gen(3)
    if causal:
        seg_q = torch.arange(nq, dtype=torch.int32).expand(b, nq).contiguous()
        seg_k = torch.arange(nk, dtype=torch.int32).expand(b, nk).contiguous()
    else:
        seg_k = sorted_segments(b, nk, max(1, nk // 9), gen)
        seg_q = seg_k if nq == nk else sorted_segments(b, nq, max(1, nk // 9), gen)
    return _fused_inputs(b, nq, nk, structure, seg_q, seg_k, gen, device, dtype)


# ------------------------------------------------------------------------------ patch_targets / patch_loss

def _images(b, c, grid, patch, gen, device, dtype) -> Tensor:
    return _randn((b, c, grid * patch, grid * patch), gen, device, dtype)


def _perm(b, tokens, keep, gen, device) -> Tensor:
    return torch.stack([torch.randperm(tokens, generator=gen)[:keep] for _ in range(b)]).to(device)


def targets_check(device, dtype, structure) -> Case:
    """structure = (channels, patch_size, blur_kernel, norm_pix, gathered)."""
    channels, patch, blur, norm_pix, gathered = structure
    gen = _gen(2)
    images = _images(2, channels, 5, patch, gen, device, dtype)
    perm = _perm(2, 25, 19, gen, device) if gathered else None
    return Case((images, patch, blur, 1.0, norm_pix, perm), (), ("targets",))


def targets_timing(device, dtype, structure, shape) -> Case:
    """shape = (B, H, W, rows gathered or 0)."""
    channels, patch, blur, norm_pix, gathered = structure
    b, height, width, rows = shape
    gen = _gen(3)
    images = _randn((b, channels, height, width), gen, device, dtype)
    tokens = (height // patch) * (width // patch)
    perm = _perm(b, tokens, rows, gen, device) if gathered else None
    return Case((images, patch, blur, 1.0, norm_pix, perm), (), ("targets",))


def loss_check(device, dtype, structure) -> Case:
    """structure = (channels, patch_size, blur_kernel, norm_pix, loss, has_valid, images dtype name)."""
    channels, patch, blur, norm_pix, loss, has_valid, image_dtype = structure
    gen = _gen(4)
    images = _images(2, channels, 5, patch, gen, device, getattr(torch, image_dtype))
    perm = _perm(2, 25, 19, gen, device)
    pred = _randn((2, 19, patch * patch * channels), gen, device, dtype)
    valid = (torch.arange(19) < 15).expand(2, 19).to(device) if has_valid else None
    return Case((pred, images, patch, perm, valid, blur, 1.0, norm_pix, loss), (0,), ("loss", "dpred"))


def loss_timing(device, dtype, structure, shape) -> Case:
    """shape = (B, H, W, rows)."""
    channels, patch, blur, norm_pix, loss, has_valid, image_dtype = structure
    b, height, width, rows = shape
    gen = _gen(5)
    images = _randn((b, channels, height, width), gen, device, getattr(torch, image_dtype))
    perm = _perm(b, (height // patch) * (width // patch), rows, gen, device)
    pred = _randn((b, rows, patch * patch * channels), gen, device, dtype)
    valid = torch.ones(b, rows, dtype=torch.bool, device=device) if has_valid else None
    return Case((pred, images, patch, perm, valid, blur, 1.0, norm_pix, loss), (0,), ("loss", "dpred"))


# ------------------------------------------------------------------------------ skip_memory

def skip_check(device, dtype, structure) -> Case:
    """structure = (Lenc, Ldec, D, weight dtype name)."""
    lenc, ldec, dim, weight_dtype = structure
    gen = _gen(6)
    hidden = _randn((lenc, 2, 37, dim), gen, device, dtype)
    weight = _randn((ldec, lenc), gen, device, getattr(torch, weight_dtype))
    return Case((hidden, weight), (0, 1), ("memory", "dhidden", "dweight"))


def skip_timing(device, dtype, structure, shape) -> Case:
    """shape = (B, N)."""
    lenc, ldec, dim, weight_dtype = structure
    b, n = shape
    gen = _gen(7)
    hidden = _randn((lenc, b, n, dim), gen, device, dtype)
    weight = _randn((ldec, lenc), gen, device, getattr(torch, weight_dtype))
    return Case((hidden, weight), (0, 1), ("memory", "dhidden", "dweight"))
