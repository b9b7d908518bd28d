"""Keys that no query may see (right padding with a sentinel segment) must not change any visible
output or gradient, whatever they hold — NaN and Inf included — in every backend.

A masked probability is 0, but 0 * NaN is NaN: the backends select (torch.where / tl.where /
a zero-filled load) instead of multiplying. Each case compares the run with garbage in the hidden
keys to the same run with ordinary values there, bit for bit, and asserts the hidden keys get
exactly zero gradient. Triton runs under the interpreter on CPU (fp32); the CUDA extension needs
a GPU (its masking is compile-checked by csrc/compile_check.sh).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from randsac_fast import ops, reference  # noqa: E402

SENTINEL = 1 << 20
# seg rows: 3 real segments then sentinel padding (keys 30.. of row 0 and 25.. of row 1 are hidden)
SEG_K = torch.tensor([[0] * 10 + [1] * 10 + [2] * 10 + [SENTINEL] * 7,
                      [0] * 5 + [1] * 15 + [2] * 5 + [SENTINEL] * 12], dtype=torch.int32)
SEG_Q = SEG_K[:, :30].clone()
SEG_Q[1, 25:] = SENTINEL          # padded query rows too


def _inputs(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, SEG_Q.shape[1], 16, generator=g)
    k, v = (torch.randn(2, 2, SEG_K.shape[1], 16, generator=g) for _ in range(2))
    do = torch.randn(2, 2, SEG_Q.shape[1], 16, generator=g)
    return [t.to(device, dtype) for t in (q, k, v, do)]


def _run(q, k, v, do, seg_q, seg_k, inclusive, backend, grad=True):
    if not grad:
        with torch.no_grad():
            return (ops.segment_attention(q, k, v, seg_q, seg_k, inclusive=inclusive, backend=backend),)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = ops.segment_attention(q, k, v, seg_q, seg_k, inclusive=inclusive, backend=backend)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def _backends():
    out = [("reference", "cpu", True), ("sdpa", "cpu", True), ("flex", "cpu", False), ("triton", "cpu", True)]
    marks = {"cuda": pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")}
    params = [pytest.param(*b, id=b[0]) for b in out]
    params.append(pytest.param("cuda", "cuda", True, id="cuda", marks=marks["cuda"]))
    params.append(pytest.param("xformers", "cuda", True, id="xformers", marks=marks["cuda"]))
    return params


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("inclusive", [True, False], ids=["inclusive", "strict"])
@pytest.mark.parametrize("backend,device,grad", _backends())
def test_hidden_keys_change_nothing(backend, device, grad, inclusive, bad):
    if backend == "triton":
        pytest.importorskip("triton", reason="needs triton (pip install '.[triton]')")
    dtype = torch.float16 if backend == "cuda" else torch.float32
    seg_q, seg_k = SEG_Q.to(device), SEG_K.to(device)
    q, k, v, do = _inputs(dtype, device)
    # The padded query row (sentinel) sees the sentinel keys under the inclusive rule: for this test
    # the hidden keys are exactly those no query sees.
    hidden = ~reference.seen_keys(seg_q, seg_k, inclusive)[:, None, :, None]
    assert hidden.any()
    k_bad = torch.where(hidden, torch.tensor(bad, dtype=dtype, device=device), k)
    v_bad = torch.where(hidden, torch.tensor(bad, dtype=dtype, device=device), v)
    try:
        clean = _run(q, k, v, do, seg_q, seg_k, inclusive, backend, grad)
    except ops.BackendUnavailable as e:
        if backend not in ("cuda", "xformers"):      # optional: the compiled extension, the xformers package
            raise
        pytest.skip(f"needs the optional {backend} backend built / installed: {e}")
    ops.set_checks(True)              # hidden keys may hold anything even with the data checks on
    dirty = _run(q, k_bad, v_bad, do, seg_q, seg_k, inclusive, backend, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), clean, dirty):
        assert torch.isfinite(b).all(), f"{backend} {name}: non-finite"
        assert torch.equal(a, b), f"{backend} {name}: changed by the hidden keys"
    for name, g in zip(("dk", "dv"), dirty[2:]):
        assert not g.masked_select(hidden.expand_as(g)).any(), f"{backend} {name}: hidden key got gradient"


def test_a_visible_nan_is_refused_while_checks_are_on():
    q, k, v, _ = _inputs(torch.float32, "cpu")
    k[0, 1, 3, 0] = float("nan")         # key 3 of row 0: seen
    ops.set_checks(True)
    with pytest.raises(ValueError, match=r"k \(at a key some query sees\) holds NaN at index \(0, 1, 3, 0\)"):
        ops.segment_attention(q, k, v, SEG_Q, SEG_K, inclusive=True, backend="sdpa")
