"""Backend ``cuda`` of segment_attention (the compiled kernels in csrc/).

GPU tests: forward and gradients against the float64 dense reference (FlashAttention tolerance
rule: error <= 3x plain PyTorch's error in the same dtype) and against the Triton backend, on
sampled orders. CPU tests: the loop-bound code the kernels run (csrc/tile_range.h, compiled by the
host compiler) against the dense visibility mask; the errors when the extension is missing; the
wrapper's own checks and the op registration (fake kernels, autograd) with a stand-in extension.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import assert_close_by_rule, max_err, random_seg
from randsac_fast import ops, orders, reference
from randsac_fast.kernels import cuda_ext

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --------------------------------------------------------------------------------------------
# Cases: sampled orders, Nq != Nk, padded sentinels, fully masked rows, tails
# --------------------------------------------------------------------------------------------
def _pad(seg: torch.Tensor, n: int, sentinel: int) -> torch.Tensor:
    return torch.cat([seg, torch.full((seg.shape[0], n), sentinel, dtype=torch.int32)], dim=1)


def _segs(case: str, gen: torch.Generator):
    """-> seg_q [B, Nq], seg_k [B, Nk] (int32, CPU) for a named case."""
    if case == "random-8x8":       # SAIM: every token its own segment
        seg = orders.sample("random", 2, (8, 8), generator=gen).seg
        return seg, seg
    if case == "square-10x10":     # 100 tokens: a tail tile in both directions
        seg = orders.sample("square:25", 2, (10, 10), generator=gen).seg
        return seg, seg
    if case == "blob-padded":      # ragged blobs, right-padded with a sentinel segment id
        seg = orders.sample("blob:8", 2, (9, 9), generator=gen).seg
        sentinel = int(seg.max()) + 1
        return _pad(seg, 7, sentinel), _pad(seg, 11, sentinel)
    if case == "hier-shifted":     # queries are the later tokens: Nq < Nk
        seg = orders.sample("square:16/4", 2, (8, 8), generator=gen).seg
        return seg[:, 24:].contiguous(), seg
    if case == "keys-trimmed":     # keys drop the last tokens: Nq > Nk
        seg = orders.sample("square:16", 2, (12, 12), generator=gen).seg
        return seg, seg[:, :-40].contiguous()
    raise ValueError(case)


CASES = ["random-8x8", "square-10x10", "blob-padded", "hier-shifted", "keys-trimmed"]


# --------------------------------------------------------------------------------------------
# CPU: the kernels' loop bounds (tile_range.h) against the dense mask
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tile_range_binary(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs g++")
    exe = tmp_path_factory.mktemp("tile_range") / "tile_range_test"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", str(ROOT / "csrc" / "tile_range_test.cpp"),
                    "-o", str(exe)], check=True)
    return exe


def _run_tile_ranges(exe, problems):
    """problems: [(seg_q [Nq], seg_k [Nk], inclusive, block_m, block_n)] -> parsed outputs."""
    text = "".join(f"{len(sq)} {len(sk)} {int(inc)} {bm} {bn}\n{' '.join(map(str, sq.tolist()))}\n"
                   f"{' '.join(map(str, sk.tolist()))}\n" for sq, sk, inc, bm, bn in problems)
    lines = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True).stdout.splitlines()
    results, i = [], 0
    for sq, sk, _, bm, bn in problems:
        kv_len = [int(x) for x in lines[i].split()[1:]]
        q_start = [int(x) for x in lines[i + 1].split()[1:]]
        n_qt, n_kt = -(-len(sq) // bm), -(-len(sk) // bn)
        key_loops = [tuple(int(x) for x in line.split()[1:]) for line in lines[i + 2: i + 2 + n_qt]]
        query_loops = [tuple(int(x) for x in line.split()[1:]) for line in lines[i + 2 + n_qt: i + 2 + n_qt + n_kt]]
        results.append((kv_len, q_start, key_loops, query_loops))
        i += 2 + n_qt + n_kt
    assert i == len(lines)
    return results


def test_tile_ranges_match_the_dense_mask(tile_range_binary):
    gen = torch.Generator().manual_seed(0)
    problems = []
    for case in CASES:
        seg_q, seg_k = _segs(case, gen)
        for inclusive in (True, False):
            for bm, bn in ((64, 64), (64, 32), (4, 8), (5, 3)):
                problems.append((seg_q[0], seg_k[0], inclusive, bm, bn))
    for n in (1, 7, 40):  # random segment counts, including one segment and N = 1
        s = random_seg(2, n, max(1, n // 3), gen)
        problems += [(s[0], s[1], inc, 4, 8) for inc in (True, False)]
    for (sq, sk, inclusive, bm, bn), (kv_len, q_start, key_loops, query_loops) in zip(
            problems, _run_tile_ranges(tile_range_binary, problems)):
        mask = reference.visibility(sq[None], sk[None], inclusive)[0]  # [Nq, Nk]
        nq, nk = mask.shape
        # Visible keys of a query are the prefix [0, kv_len); the queries of a key the suffix [q_start, Nq).
        assert torch.equal(mask, torch.arange(nk)[None] < torch.tensor(kv_len)[:, None])
        assert torch.equal(mask, torch.arange(nq)[:, None] >= torch.tensor(q_start)[None])
        assert [t[0] for t in key_loops] == list(range(0, nq, bm))
        assert [t[0] for t in query_loops] == list(range(0, nk, bn))
        for m0, end, unmasked_end in key_loops:
            rows = mask[m0: m0 + bm]
            assert end == (int(rows.nonzero()[:, 1].max()) + 1 if rows.any() else 0)  # tight key loop
            assert unmasked_end % bn == 0 and unmasked_end <= end
            assert rows[:, :unmasked_end].all()                      # unmasked tiles: all visible
            if unmasked_end + bn <= nk:                              # and the next tile needs a mask
                assert not rows[:, unmasked_end: unmasked_end + bn].all()
        for n0, begin, unmasked_begin in query_loops:
            cols = mask[:, n0: n0 + bn]
            first = int(cols.nonzero()[:, 0].min()) if cols.any() else nq
            assert begin % bm == 0 and begin <= first < begin + bm or (first == nq and begin == nq // bm * bm)
            assert cols[unmasked_begin:].all()                       # tiles from here: all visible
            assert unmasked_begin == 0 or not cols[unmasked_begin - 1].all()  # tight


# --------------------------------------------------------------------------------------------
# CPU: errors and registration without a built extension
# --------------------------------------------------------------------------------------------
def test_missing_extension_says_how_to_build(monkeypatch):
    import randsac_fast
    monkeypatch.setitem(sys.modules, "randsac_fast._C", None)  # import of it now fails
    monkeypatch.delattr(randsac_fast, "_C", raising=False)
    monkeypatch.delitem(sys.modules, "randsac_fast.ops.attention_cuda", raising=False)
    monkeypatch.setattr(cuda_ext, "_module", None)
    monkeypatch.delenv("RANDSAC_FAST_JIT", raising=False)
    q = torch.randn(1, 1, 4, 64, dtype=torch.float16)
    seg = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(ops.BackendUnavailable) as err:
        ops.segment_attention(q, q, q, seg, seg, inclusive=True, backend="cuda")
    msg = str(err.value)
    assert "backend 'cuda'" in msg and "pip install -e . --no-build-isolation" in msg
    assert "RANDSAC_FAST_JIT=1" in msg


def test_jit_build_without_cuda_says_why(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ImportError, match=r"CPU build.*pip install -e \. --no-build-isolation"):
        cuda_ext.build_jit()


_STUB_SCRIPT = textwrap.dedent("""
    import sys, types, torch
    def forward(q, k, v, seg_q, seg_k, inclusive, scale, stream):
        raise AssertionError("the extension must not be reached")
    sys.modules["randsac_fast._C"] = types.SimpleNamespace(forward=forward, backward=forward, forward_fused=forward,
                                                            backward_fused=forward)
    from randsac_fast import ops
    from randsac_fast.ops import attention_cuda as ac

    def expect(exc, text, q):
        seg = torch.zeros(q.shape[0], q.shape[2], dtype=torch.int32)
        try:
            ops.segment_attention(q, q, q, seg, seg, inclusive=True, backend="cuda")
        except exc as e:
            assert text in str(e), str(e)
        else:
            raise AssertionError(f"no {exc.__name__} for {q.dtype} {tuple(q.shape)} {q.device}")

    expect(TypeError, "fp16 or bf16; got torch.float32", torch.zeros(1, 1, 4, 64))
    expect(ValueError, "head dims (32, 64, 128); got 48", torch.zeros(1, 1, 4, 48, dtype=torch.float16))
    expect(ops.BackendUnavailable, "runs on CUDA tensors; got cpu", torch.zeros(1, 1, 4, 64, dtype=torch.float16))

    # The registered ops: fake kernels give the shapes, autograd reaches the backward op.
    q = torch.empty(2, 3, 5, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
    k = torch.empty(2, 3, 9, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
    sq = torch.empty(2, 5, dtype=torch.int32, device="meta")
    sk = torch.empty(2, 9, dtype=torch.int32, device="meta")
    out, lse = torch.ops.randsac_fast.segment_attn_cuda_fwd(q, k, k, sq, sk, True, 0.125)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 3, 5) and lse.dtype == torch.float32
    assert not lse.requires_grad and out.requires_grad
    dq, dk = torch.autograd.grad(out.sum(), (q, k))
    assert dq.shape == q.shape and dk.shape == k.shape

    # The fused layouts: the head dim is the packed width / parts / heads, checked before any launch.
    for exc, text, x in ((TypeError, "fp16 or bf16; got torch.float32", torch.zeros(1, 4, 3 * 2 * 64)),
                         (ValueError, "got 48", torch.zeros(1, 4, 3 * 2 * 48, dtype=torch.float16)),
                         (ops.BackendUnavailable, "got cpu", torch.zeros(1, 4, 3 * 2 * 64, dtype=torch.float16))):
        try:
            ac.fused_attention_cuda(x, None, None, 2, 0.125)
        except exc as e:
            assert text in str(e), str(e)
        else:
            raise AssertionError(f"no {exc.__name__} for fused {x.dtype} {tuple(x.shape)}")
    assert ops.attention._FUSED_TABLE["cuda"]() is ac.fused_attention_cuda  # no per-head adapter

    # Fused ops: the output is [B, Nq, H*D]; gradients come back in the projections' own layouts.
    qkv = torch.empty(2, 9, 3 * 3 * 64, dtype=torch.float16, device="meta", requires_grad=True)
    out, lse = torch.ops.randsac_fast.segment_attn_cuda_fused_fwd(qkv, None, sk, sk, 3, True, 0.125)
    assert out.shape == (2, 9, 3 * 64) and lse.shape == (2, 3, 9) and lse.dtype == torch.float32
    (dqkv,) = torch.autograd.grad(out.sum(), (qkv,))
    assert dqkv.shape == qkv.shape and dqkv.dtype == qkv.dtype
    qx = torch.empty(2, 5, 2 * 32, dtype=torch.bfloat16, device="meta", requires_grad=True)
    kv = torch.empty(2, 9, 2 * 2 * 32, dtype=torch.bfloat16, device="meta", requires_grad=True)
    out, lse = torch.ops.randsac_fast.segment_attn_cuda_fused_fwd(qx, kv, sq, sk, 2, False, 0.125)
    assert out.shape == (2, 5, 2 * 32) and lse.shape == (2, 2, 5)
    dqx, dkv = torch.autograd.grad(out.sum(), (qx, kv))
    assert dqx.shape == qx.shape and dkv.shape == kv.shape
    print("ok")
""")


def test_wrapper_checks_and_op_registration_with_stub_extension():
    """Runs in a fresh interpreter: the stand-in extension must not leak into other tests."""
    res = subprocess.run([sys.executable, "-c", _STUB_SCRIPT], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


# --------------------------------------------------------------------------------------------
# GPU: parity with the float64 reference and with the Triton backend
# --------------------------------------------------------------------------------------------
def _inputs(seg_q, seg_k, heads, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    b, nq, nk = seg_q.shape[0], seg_q.shape[1], seg_k.shape[1]
    q, k, v, do = (torch.randn(b, heads, n, dim, generator=gen, dtype=torch.float64)
                   for n in (nq, nk, nk, nq))
    return [t.to(dtype).cuda() for t in (q, k, v, do)], seg_q.cuda(), seg_k.cuda()


def _fwd_bwd(fn, q, k, v, do):
    """-> out, dq, dk, dv of fn(q, k, v) with output gradient do."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do.to(out.dtype)))


def _attn(backend, seg_q, seg_k, inclusive):
    def fn(q, k, v):
        if backend == "plain":
            return reference.segment_attention(q, k, v, seg_q, seg_k, inclusive=inclusive)
        return ops.segment_attention(q, k, v, seg_q, seg_k, inclusive=inclusive, backend=backend)
    return fn


@needs_cuda
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("inclusive", [True, False], ids=["inclusive", "strict"])
@pytest.mark.parametrize("case", CASES)
def test_cuda_matches_reference_and_triton(case, inclusive, dtype, dim):
    seg_q, seg_k = _segs(case, torch.Generator().manual_seed(1))
    (q, k, v, do), seg_q, seg_k = _inputs(seg_q, seg_k, 3, dim, dtype, seed=2)
    ref64 = _fwd_bwd(_attn("plain", seg_q, seg_k, inclusive), q.double(), k.double(), v.double(), do.double())
    plain = _fwd_bwd(_attn("plain", seg_q, seg_k, inclusive), q, k, v, do)
    fast = _fwd_bwd(_attn("cuda", seg_q, seg_k, inclusive), q, k, v, do)
    triton = _fwd_bwd(_attn("triton", seg_q, seg_k, inclusive), q, k, v, do)
    for name, f, p, r, t in zip(("out", "dq", "dk", "dv"), fast, plain, ref64, triton):
        assert f.dtype == dtype and f.shape == r.shape
        assert_close_by_rule(f, p, r, factor=3.0, floor=1e-5, what=f"{name} vs float64")
        # Against the Triton backend: both sit within the rule of the reference, so within twice it.
        assert max_err(f, t) <= 6.0 * max_err(p, r) + 2e-5, f"{name} vs triton"

    # Rows that see no key: output and dq exactly 0; keys seen by no query: dk, dv exactly 0.
    mask = reference.visibility(seg_q, seg_k, inclusive)   # [B, Nq, Nk]
    blind_q, unseen_k = ~mask.any(2), ~mask.any(1)
    out, dq, dk, dv = fast
    assert (out[blind_q[:, None].expand_as(out[..., 0])] == 0).all()
    assert (dq[blind_q[:, None].expand_as(dq[..., 0])] == 0).all()
    assert (dk[unseen_k[:, None].expand_as(dk[..., 0])] == 0).all()
    assert (dv[unseen_k[:, None].expand_as(dv[..., 0])] == 0).all()
    if case in ("random-8x8", "blob-padded") and not inclusive:
        assert blind_q.any() and unseen_k.any()  # the case really exercises both


@needs_cuda
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_strided_inputs_head_dim_32(dtype, offset):
    """q, k, v as strided views of a fused qkv projection; offset 1 (2 bytes) rules out 16-byte loads."""
    _, seg = _segs("blob-padded", torch.Generator().manual_seed(3))
    seg = seg.cuda()
    b, n, h, d = seg.shape[0], seg.shape[1], 2, 32
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(b, n, 3, h, d, generator=gen, dtype=torch.float64).cuda()
    do = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(dtype).cuda()

    def run(backend, dt):
        buf = torch.zeros(qkv.numel() + offset, dtype=dt, device="cuda")
        buf[offset:] = qkv.flatten().to(dtype).to(dt)        # same rounded values for every backend
        buf.requires_grad_()
        q, k, v = buf[offset:].view(qkv.shape).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, D]
        out = _attn(backend, seg, seg, True)(q, k, v)
        (grad,) = torch.autograd.grad(out, buf, do.to(dt))
        return out.detach(), grad[offset:]

    ref64, plain, fast = run("plain", torch.float64), run("plain", dtype), run("cuda", dtype)
    for name, f, p, r in zip(("out", "dqkv"), fast, plain, ref64):
        assert_close_by_rule(f, p, r, factor=3.0, floor=1e-5, what=f"{name} (strided, offset {offset})")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("which", ["self", "cross"])
def test_cuda_fused_layouts(which, dtype):
    """The models' fused projections, read and written in place by strides: output and the
    projections' gradients against the float64 reference (the rule), blind rows exactly 0."""
    seg_q, seg_k = _segs("blob-padded" if which == "self" else "hier-shifted", torch.Generator().manual_seed(9))
    if which == "self":
        seg_q = seg_k
    bounds = ops.segment_bounds(seg_q.cuda(), seg_k.cuda(), inclusive=which == "self")
    b, nq, nk, h, d = seg_q.shape[0], seg_q.shape[1], seg_k.shape[1], 2, 64
    gen = torch.Generator().manual_seed(10)
    srcs = ([torch.randn(b, nq, 3 * h * d, generator=gen, dtype=torch.float64)] if which == "self" else
            [torch.randn(b, nq, h * d, generator=gen, dtype=torch.float64),
             torch.randn(b, nk, 2 * h * d, generator=gen, dtype=torch.float64)])
    do = torch.randn(b, nq, h * d, generator=gen, dtype=torch.float64).to(dtype).cuda()
    fn = ops.segment_attention_qkv if which == "self" else ops.segment_attention_cross

    def run(backend, dt):
        xs = [x.to(dtype).to(dt).cuda().requires_grad_() for x in srcs]   # same rounded values everywhere
        out = fn(*xs, bounds, h, backend=backend)
        return (out.detach(), *torch.autograd.grad(out, xs, do.to(dt)))

    ref64, plain, fast = run("reference", torch.float64), run("reference", dtype), run("cuda", dtype)
    for name, f, p, r in zip(("out", "d_q_src", "d_kv_src"), fast, plain, ref64):
        assert f.dtype == dtype and f.shape == r.shape
        assert_close_by_rule(f, p, r, factor=3.0, floor=1e-5, what=f"{name} ({which})")
    blind = bounds.kv_len == 0
    assert (fast[0][blind] == 0).all()


@needs_cuda
def test_cuda_backward_is_deterministic():
    seg_q, seg_k = _segs("square-10x10", torch.Generator().manual_seed(5))
    (q, k, v, do), seg_q, seg_k = _inputs(seg_q, seg_k, 4, 64, torch.bfloat16, seed=6)
    fn = _attn("cuda", seg_q, seg_k, True)
    first, second = _fwd_bwd(fn, q, k, v, do), _fwd_bwd(fn, q, k, v, do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_cuda
def test_cuda_opcheck_and_compile():
    from randsac_fast.ops import attention_cuda

    seg_q, seg_k = _segs("hier-shifted", torch.Generator().manual_seed(7))
    (q, k, v, do), seg_q, seg_k = _inputs(seg_q, seg_k, 2, 64, torch.float16, seed=8)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(attention_cuda._fwd, (q, k, v, seg_q, seg_k, True, 0.125))
    out, lse = attention_cuda._fwd(q, k, v, seg_q, seg_k, True, 0.125)
    torch.library.opcheck(attention_cuda._bwd, (do, q.detach(), k.detach(), v.detach(), out.detach(), lse,
                                                 seg_q, seg_k, True, 0.125))

    def f(q, k, v):  # the backend entry point itself (the public dispatcher is tested elsewhere)
        return attention_cuda.segment_attention_cuda(q, k, v, seg_q, seg_k, True, 0.125)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager, graph = _fwd_bwd(f, q, k, v, do), _fwd_bwd(compiled, q, k, v, do)
    for a, b in zip(eager, graph):
        assert torch.equal(a, b)
