"""pytest-benchmark variant of bench_attention.py (GPU only): the quick shapes, fwd+bwd, bf16.

    pytest benchmarks/test_bench_attention.py --benchmark-columns=median,iqr
"""
import pytest
import torch

from bench_attention import QUICK, SHAPES, make_inputs, runners

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BACKENDS = ["triton", "cuda", "sdpa_mask", "flex", "flex_nobuild", "causal_sdpa"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s.name in QUICK], ids=lambda s: s.name)
def test_attention_fwd_bwd(benchmark, shape, backend):
    q, k, v, seg, _ = make_inputs(shape, torch.bfloat16, "cuda")
    fn, qkv, flops = runners(shape, q, k, v, seg, True, {"flex": True, "xformers": False})[backend]
    leaves = [t.detach().requires_grad_() for t in qkv]
    grad = torch.randn_like(leaves[0])

    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad)
        torch.cuda.synchronize()

    try:
        step()   # compile / autotune outside the timing
    except Exception as e:   # the compiled extension is optional
        if backend == "cuda":
            pytest.skip(f"needs the compiled cuda extension ({type(e).__name__})")
        raise
    benchmark.extra_info.update(shape=shape.name, forward_flops=flops, tokens=qkv[0].shape[2])
    benchmark.pedantic(step, rounds=20, warmup_rounds=3)
