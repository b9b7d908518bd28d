"""Triton segment attention (forward, dQ, dK, dV) against the float64 dense reference.

Without a GPU the kernels run under the Triton interpreter on CPU (fp32 and fp16; the interpreter
mishandles bf16 dots). On a CUDA machine the same tests run on the GPU with compiled kernels, plus
bf16, opcheck and inductor. Tolerance: FlashAttention's rule, via ``helpers.assert_close_by_rule``.
"""
import importlib
import os

import torch

# triton.jit picks interpreter vs compiler when a kernel is defined, so the switch must be set
# before the kernels are imported. Only without CUDA: on a GPU machine other modules' kernels
# must stay compiled.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from helpers import assert_close_by_rule, random_seg  # noqa: E402
from randsac_fast import ops, orders, reference  # noqa: E402
from randsac_fast.kernels import triton_attention as kernels  # noqa: E402
from randsac_fast.ops import attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not kernels.INTERPRET:   # imported earlier without the switch: redefine the kernels
    importlib.reload(kernels)
DTYPES = [torch.float32, torch.float16]
# The tolerance floor. The FA2 backward forms dS = P * (dP - delta) with delta = rowsum(dO * O) from
# the stored output; where plain softmax-backward cancels exactly (e.g. a query that sees a single
# key) the kernel keeps fp32 rounding of order eps32 * |dO| |V| sqrt(D) per score, summed over the
# queries: ~1e-6..1e-5 at these unit-scale inputs. Real bugs show up at 1e-2 and above.
FLOOR = 2e-5
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _qkv(b, h, nq, nk, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
            for n in (nq, nk, nk)]


def _grad_out(shape, seed=7):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE)


def _forward_backward(fn, q, k, v, do):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), do.to(out.dtype)))


def check_parity(q, k, v, seg_q, seg_k, inclusive, what=""):
    """Triton vs plain PyTorch in the same dtype vs float64, for out, dq, dk, dv."""
    seg_q, seg_k = seg_q.to(DEVICE), seg_k.to(DEVICE)
    do = _grad_out(q.shape[:3] + (v.shape[-1],))

    def triton_fn(q_, k_, v_):
        return ops.segment_attention(q_, k_, v_, seg_q, seg_k, inclusive=inclusive, backend="triton")

    def plain_fn(q_, k_, v_):
        return reference.segment_attention(q_, k_, v_, seg_q, seg_k, inclusive=inclusive)

    fast = _forward_backward(triton_fn, q, k, v, do)
    plain = _forward_backward(plain_fn, q, k, v, do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _forward_backward(plain_fn, q64, k64, v64, do)
    for name, f, p, r in zip(("out", "dq", "dk", "dv"), fast, plain, ref):
        assert f.dtype == q.dtype and f.shape == r.shape, f"{what} {name}: {f.dtype} {tuple(f.shape)}"
        assert_close_by_rule(f, p, r, factor=3.0, floor=FLOOR, what=f"{what} {name} {q.dtype}")
    return fast


def test_visible_bounds_are_the_mask_prefixes():
    gen = torch.Generator().manual_seed(0)
    seg_q, seg_k = random_seg(3, 23, 6, gen), random_seg(3, 17, 6, gen)
    for inclusive in (True, False):
        mask = reference.visibility(seg_q, seg_k, inclusive)                      # [B, Nq, Nk]
        kv_len, q_start = kernels.visible_bounds(seg_q, seg_k, inclusive)
        assert kv_len.dtype == q_start.dtype == torch.int32
        assert torch.equal(mask, torch.arange(17) < kv_len[..., None].long())
        assert torch.equal(mask.transpose(1, 2), torch.arange(23) >= q_start[..., None].long())


# Every spec of the samplers on an 8 x 8 grid (N = 64: four 16-row tiles under the interpreter).
SPECS = ["raster", "random", "square:4", "blob:5", "square:16/4", "blob:11/5", "incoherent:4"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", SPECS)
def test_orders_of_every_spec(spec, dtype):
    order = orders.sample(spec, 2, 8, generator=torch.Generator().manual_seed(1))
    q, k, v = _qkv(2, 2, 64, 64, 16, dtype, seed=2)
    for inclusive in (True, False):
        check_parity(q, k, v, order.seg, order.seg, inclusive, what=f"{spec} inclusive={inclusive}")


def _seg(*rows):
    return torch.tensor(rows, dtype=torch.int32)


def _edge_cases():
    gen = torch.Generator().manual_seed(3)
    n = 19
    sentinel_k = random_seg(2, 30, 5, gen)
    sentinel_k[:, 24:] = 1000                       # right padding with a sentinel segment id
    late_k = random_seg(2, 21, 4, gen) + 2          # keys start at segment 2: early queries see nothing
    return {
        "one_segment": (torch.zeros(2, n, dtype=torch.int32),) * 2,
        "token_segments": (torch.arange(33, dtype=torch.int32).expand(2, 33),) * 2,
        "nq_lt_nk": (random_seg(2, 21, 5, gen), random_seg(2, 40, 5, gen)),
        "nq_gt_nk": (random_seg(2, 40, 5, gen), random_seg(2, 7, 5, gen)),
        "sentinel_keys": (random_seg(2, 17, 5, gen), sentinel_k),
        "fully_masked_rows": (random_seg(2, 21, 6, gen), late_k),
        "tail": (random_seg(2, 17, 4, gen),) * 2,
        "n1": (_seg([0], [0]),) * 2,
        "q1_kmany": (_seg([2], [0]), random_seg(2, 18, 4, gen)),
    }


EDGE = _edge_cases()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(EDGE))
def test_edge_cases(case, dtype):
    seg_q, seg_k = EDGE[case]
    q, k, v = _qkv(2, 2, seg_q.shape[1], seg_k.shape[1], 16, dtype, seed=4)
    for inclusive in (True, False):
        check_parity(q, k, v, seg_q, seg_k, inclusive, what=f"{case} inclusive={inclusive}")


@pytest.mark.parametrize("head_dim", [32, 64, 128, 40])
def test_head_dims(head_dim):
    gen = torch.Generator().manual_seed(5)
    seg_q, seg_k = random_seg(1, 20, 4, gen), random_seg(1, 18, 4, gen)
    q, k, v = _qkv(1, 2, 20, 18, head_dim, torch.float32, seed=6)
    check_parity(q, k, v, seg_q, seg_k, True, what=f"D={head_dim}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_views_of_fused_qkv(dtype):
    b, n, h, d = 2, 26, 2, 16
    gen = torch.Generator().manual_seed(8)
    qkv = torch.randn(b, n, 3, h, d, generator=gen, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
    seg = random_seg(b, n, 6, gen)
    q, k, v = qkv.unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))          # [B, H, N, D] views, row stride 3*H*D
    assert not q.is_contiguous() and q.stride(-1) == 1
    check_parity(q, k, v, seg, seg, True, what="fused qkv")


def test_fully_masked_rows_are_exactly_zero():
    seg_q = _seg([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 4, 4])
    q, k, v = _qkv(1, 2, 18, 18, 16, torch.float32, seed=9)
    out = ops.segment_attention(q, k, v, seg_q.to(DEVICE), seg_q.to(DEVICE), inclusive=False, backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()
    assert (out[:, :, :3] == 0).all() and (dq[:, :, :3] == 0).all()    # segment 0 sees nothing
    assert (dk[:, :, 16:] == 0).all() and (dv[:, :, 16:] == 0).all()   # the last segment is seen by no one
    assert out[:, :, 3:].abs().sum(-1).gt(0).all()


def test_backward_is_deterministic():
    gen = torch.Generator().manual_seed(10)
    seg = random_seg(1, 40, 7, gen).to(DEVICE)
    q, k, v = _qkv(1, 2, 40, 40, 16, torch.float16, seed=11)
    do = _grad_out(q.shape).half()
    runs = [torch.autograd.grad(ops.segment_attention(q, k, v, seg, seg, inclusive=True, backend="triton"),
                                (q, k, v), do) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_clear_errors(monkeypatch):
    seg = torch.zeros(1, 4, dtype=torch.int32)
    x = torch.randn(1, 1, 4, 16)
    monkeypatch.setattr(kernels, "INTERPRET", False)
    with pytest.raises(ops.BackendUnavailable, match="TRITON_INTERPRET=1"):
        ops.segment_attention(x, x, x, seg, seg, inclusive=True, backend="triton")
    monkeypatch.undo()
    seg, x = seg.to(DEVICE), x.to(DEVICE).double()
    with pytest.raises(TypeError, match="fp64"):
        attention_triton.segment_attention_triton(x, x, x, seg, seg, True, 0.25)
    big = torch.randn(1, 1, 4, 160, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 128"):
        attention_triton.segment_attention_triton(big, big, big, seg, seg, True, 0.1)


def test_torch_compile_fullgraph_traces_the_op():
    gen = torch.Generator().manual_seed(12)
    seg = random_seg(2, 24, 5, gen).to(DEVICE)
    q, k, v = _qkv(2, 2, 24, 24, 16, torch.float32, seed=13)

    def f(q, k, v):
        return ops.segment_attention(q, k, v, seg, seg, inclusive=True, backend="triton", check_sorted=False)

    f(q, k, v)   # resolve the backend eagerly once: dynamo cannot trace its first import
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    out_c = compiled(q, k, v)
    grads_c = torch.autograd.grad(out_c.sum(), (q, k, v))
    out_e = f(q, k, v)
    grads_e = torch.autograd.grad(out_e.sum(), (q, k, v))
    for a, b in zip((out_c, *grads_c), (out_e, *grads_e)):
        assert torch.equal(a, b)


def test_opcheck():
    gen = torch.Generator().manual_seed(14)
    seg_q, seg_k = random_seg(1, 18, 4, gen).to(DEVICE), random_seg(1, 20, 4, gen).to(DEVICE)
    q, k, v = _qkv(1, 2, 18, 20, 16, torch.float32, seed=15)
    torch.library.opcheck(torch.ops.randsac_fast.segment_attn_fwd, (q, k, v, seg_q, seg_k, True, 0.25))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("spec,grid", [("square:16/4", 12), ("random", 14), ("blob:11/5", 14)])
def test_gpu_half_precision_vit_shapes(spec, grid, dtype):
    order = orders.sample(spec, 4, grid, generator=torch.Generator().manual_seed(16))
    n = grid * grid
    for d in (64, 128):
        q, k, v = _qkv(4, 3, n, n, d, dtype, seed=17)
        for inclusive in (True, False):
            check_parity(q, k, v, order.seg, order.seg, inclusive, what=f"{spec} D={d} inclusive={inclusive}")


@needs_cuda
@pytest.mark.parametrize("case", sorted(EDGE))
def test_gpu_bf16_edge_cases(case):
    seg_q, seg_k = EDGE[case]
    q, k, v = _qkv(2, 2, seg_q.shape[1], seg_k.shape[1], 64, torch.bfloat16, seed=18)
    for inclusive in (True, False):
        check_parity(q, k, v, seg_q, seg_k, inclusive, what=f"{case} inclusive={inclusive}")
