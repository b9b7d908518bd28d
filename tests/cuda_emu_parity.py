"""Parity of the CUDA extension's kernels, run on the CPU emulation, with the float64 reference.

Run by tests/test_cuda_emu.py in a child process with RANDSAC_FAST_CUDA_EMU=1 (the `cuda` backend
then loads the emulated build and takes CPU tensors; a child keeps that out of the main test
process). Not collected on its own (no test_ prefix). Everything goes through the public
``ops.segment_attention(..., backend="cuda")``: the custom ops, the binding, the C API, the
kernels. Tolerance: the FlashAttention rule as in the GPU tests (error <= 3x plain PyTorch's
error in the same dtype + 1e-5).
"""
import os
import time

import pytest
import torch

from helpers import assert_close_by_rule
from randsac_fast import reference
from test_attention_cuda import CASES, _attn, _fwd_bwd, _segs

if os.environ.get("RANDSAC_FAST_CUDA_EMU", "0") in ("", "0"):
    pytest.skip("run through tests/test_cuda_emu.py (needs RANDSAC_FAST_CUDA_EMU=1)", allow_module_level=True)

TIMES: dict[str, float] = {}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _grid():
    """Every case x mask x dtype once, head dims cycling through 32 / 64 / 128 (each case meets
    at least two dims; each dim both dtypes and both masks)."""
    dims = (64, 128, 32)
    out, i = [], 0
    for case in CASES:
        for inclusive in (True, False):
            for dt in DTYPES:
                out.append(pytest.param(case, inclusive, dt, dims[i % 3],
                                        id=f"{case}-{'inclusive' if inclusive else 'strict'}-{dt}-d{dims[i % 3]}"))
                i += 1
    return out


@pytest.fixture(autouse=True)
def _timed(request):
    t0 = time.perf_counter()
    yield
    TIMES[request.node.name] = time.perf_counter() - t0


def test_emulated_build_is_loaded():
    from randsac_fast.ops import attention_cuda
    assert attention_cuda.EMULATED and attention_cuda._C.EMULATED


@pytest.mark.parametrize("case,inclusive,dt,dim", _grid())
def test_matches_reference(case, inclusive, dt, dim):
    dtype = DTYPES[dt]
    seg_q, seg_k = _segs(case, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    b, nq, nk, heads = seg_q.shape[0], seg_q.shape[1], seg_k.shape[1], 2
    q, k, v, do = (torch.randn(b, heads, n, dim, generator=gen, dtype=torch.float64).to(dtype)
                   for n in (nq, nk, nk, nq))
    mask = reference.visibility(seg_q, seg_k, inclusive)   # [B, Nq, Nk]
    blind_q, unseen_k = ~mask.any(2), ~mask.any(1)
    # Keys no query sees may hold anything (padding): give the kernels NaN / Inf there.
    k_fast, v_fast = k.clone(), v.clone()
    k_fast[unseen_k[:, None].expand_as(k[..., 0])] = float("nan")
    v_fast[unseen_k[:, None].expand_as(v[..., 0])] = float("inf")

    ref64 = _fwd_bwd(_attn("plain", seg_q, seg_k, inclusive), q.double(), k.double(), v.double(), do.double())
    plain = _fwd_bwd(_attn("plain", seg_q, seg_k, inclusive), q, k, v, do)
    fast = _fwd_bwd(_attn("cuda", seg_q, seg_k, inclusive), q, k_fast, v_fast, do)
    for name, f, p, r in zip(("out", "dq", "dk", "dv"), fast, plain, ref64):
        assert f.dtype == dtype and f.shape == r.shape
        assert_close_by_rule(f, p, r, factor=3.0, floor=1e-5, what=f"{name} vs float64")

    # Rows that see no key: output and dq exactly 0; keys seen by no query: dk, dv exactly 0.
    out, dq, dk, dv = fast
    assert (out[blind_q[:, None].expand_as(out[..., 0])] == 0).all()
    assert (dq[blind_q[:, None].expand_as(dq[..., 0])] == 0).all()
    assert (dk[unseen_k[:, None].expand_as(dk[..., 0])] == 0).all()
    assert (dv[unseen_k[:, None].expand_as(dv[..., 0])] == 0).all()
    if case in ("random-8x8", "blob-padded") and not inclusive:
        assert blind_q.any() and unseen_k.any()  # the case really exercises both


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dt", ["fp16", "bf16"])
def test_strided_views_of_a_fused_projection(dt, offset):
    """q, k, v as strided views of one qkv buffer; offset 1 (2 bytes) rules out 16-byte copies."""
    dtype = DTYPES[dt]
    _, seg = _segs("blob-padded", torch.Generator().manual_seed(3))
    b, n, h, d = seg.shape[0], seg.shape[1], 2, 32
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(b, n, 3, h, d, generator=gen, dtype=torch.float64)
    do = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(dtype)

    def run(backend, dt_):
        buf = torch.zeros(qkv.numel() + offset, dtype=dt_)
        buf[offset:] = qkv.flatten().to(dtype).to(dt_)
        buf.requires_grad_()
        q, k, v = buf[offset:].view(qkv.shape).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, D]
        out = _attn(backend, seg, seg, True)(q, k, v)
        (grad,) = torch.autograd.grad(out, buf, do.to(dt_))
        return out.detach(), grad[offset:]

    ref64, plain, fast = run("plain", torch.float64), run("plain", dtype), run("cuda", dtype)
    for name, f, p, r in zip(("out", "dqkv"), fast, plain, ref64):
        assert_close_by_rule(f, p, r, factor=3.0, floor=1e-5, what=f"{name} (strided, offset {offset})")


def test_backward_is_deterministic():
    seg_q, seg_k = _segs("square-10x10", torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(6)
    q, k, v, do = (torch.randn(2, 2, 100, 64, generator=gen).to(torch.bfloat16) for _ in range(4))
    fn = _attn("cuda", seg_q, seg_k, True)
    for a, b in zip(_fwd_bwd(fn, q, k, v, do), _fwd_bwd(fn, q, k, v, do)):
        assert torch.equal(a, b)


def test_zz_report_times():
    """Last (by name): the per-case wall times, for the parent's report."""
    for name, t in sorted(TIMES.items()):
        print(f"EMU-TIME {t:7.2f} s  {name}")
