"""Benchmark peers of the fused kernels (FlexAttention, xformers) against the float64 reference.

FlexAttention runs eagerly on CPU (forward only: it has no CPU backward) and compiled, with
gradients, on CUDA. xformers is optional.
"""
import importlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_by_rule, random_seg
from randsac_fast import ops, orders, reference

try:
    import xformers.ops  # noqa: F401
    HAVE_XFORMERS = True
except ImportError:
    HAVE_XFORMERS = False

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_xformers = pytest.mark.skipif(not (HAVE_XFORMERS and torch.cuda.is_available()),
                                    reason="needs xformers and a CUDA device")


def _qkv(b, h, nq, nk, d, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(device, dtype) for n in (nq, nk, nk)]


def _cases():
    gen = torch.Generator().manual_seed(0)
    order = orders.sample("square:16/4", 2, 8, generator=gen)
    late_k = random_seg(2, 21, 4, gen) + 2                 # early queries see no key
    padded_k = random_seg(2, 30, 5, gen)
    padded_k[:, 25:] = 1000                                 # sentinel padding
    return {"square16/4": (order.seg, order.seg), "masked_rows": (random_seg(2, 19, 5, gen), late_k),
            "sentinel": (random_seg(2, 23, 5, gen), padded_k)}


CASES = _cases()


def _check(backend, case, dtype, device, grads):
    """backend: a name for ops.segment_attention, or an implementation fn(q, k, v, seg_q, seg_k, inclusive, scale)."""
    seg_q, seg_k = (s.to(device) for s in CASES[case])
    q, k, v = _qkv(2, 2, seg_q.shape[1], seg_k.shape[1], 16, dtype, device, seed=1)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)
    for inclusive in (True, False):
        results = []
        for impl, cast in ((backend, dtype), ("reference", dtype), ("reference", torch.float64)):
            args = [t.detach().to(cast).requires_grad_(grads) for t in (q, k, v)]
            if callable(impl):
                out = impl(*args, seg_q, seg_k, inclusive, q.shape[-1] ** -0.5)
            else:
                out = ops.segment_attention(*args, seg_q, seg_k, inclusive=inclusive, backend=impl)
            results.append([out] + (list(torch.autograd.grad(out, args, do.to(cast))) if grads else []))
        for name, fast, plain, ref in zip(("out", "dq", "dk", "dv"), *results):
            assert_close_by_rule(fast, plain, ref, factor=3.0, floor=1e-6, what=f"{backend} {case} {name}")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("case", sorted(CASES))
def test_flex_forward_cpu(case):
    with torch.no_grad():
        _check("flex", case, torch.float32, "cpu", grads=False)


def test_flex_rejects_cpu_backward():
    seg = torch.zeros(1, 4, dtype=torch.int32)
    x = torch.randn(1, 1, 4, 16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="no backward on CPU"):
        ops.segment_attention(x, x, x, seg, seg, inclusive=True, backend="flex")


def test_flex_block_mask_matches_visibility():
    from randsac_fast.ops.attention_flex import segment_block_mask
    seg_q, seg_k = CASES["masked_rows"]
    for inclusive in (True, False):
        dense = segment_block_mask(seg_q, seg_k, inclusive, block_size=8).to_dense()   # [B, 1, nq_blocks, nk_blocks]
        mask = reference.visibility(seg_q, seg_k, inclusive)
        nq, nk = dense.shape[-2:]
        pad = F.pad(mask, (0, nk * 8 - mask.shape[2], 0, nq * 8 - mask.shape[1]))
        any_visible = pad.reshape(mask.shape[0], nq, 8, nk, 8).any(dim=(2, 4))
        assert torch.equal(dense[:, 0].bool(), any_visible)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_flex_gpu(case, dtype):
    _check("flex", case, dtype, "cuda", grads=True)


@needs_xformers
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_xformers_gpu(case, dtype):
    _check("xformers", case, dtype, "cuda", grads=True)


def test_xformers_wrapper_with_a_stand_in(monkeypatch):
    """The wrapper's layout and bias logic, with SDPA standing in for memory_efficient_attention."""
    def memory_efficient_attention(q, k, v, attn_bias=None, scale=None):      # [B, M, H, K] layout
        assert q.stride(-1) == 1 and attn_bias.shape == (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn_bias, scale=scale)
        return out.transpose(1, 2)

    fake = types.ModuleType("xformers")
    fake.ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)
    monkeypatch.delitem(sys.modules, "randsac_fast.ops.attention_xformers", raising=False)
    # Called directly, not through the dispatcher, whose loaders cache what they load.
    wrapper = importlib.import_module("randsac_fast.ops.attention_xformers").segment_attention_xformers
    monkeypatch.delitem(sys.modules, "randsac_fast.ops.attention_xformers")   # forget the stand-in
    for case in sorted(CASES):
        _check(wrapper, case, torch.float32, "cpu", grads=True)


def test_xformers_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)          # import xformers -> ImportError
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    monkeypatch.delitem(sys.modules, "randsac_fast.ops.attention_xformers", raising=False)
    with pytest.raises(ImportError, match="pip install xformers"):
        importlib.import_module("randsac_fast.ops.attention_xformers")
