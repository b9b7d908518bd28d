"""The models' own attention (``segment_attention_qkv`` / ``_cross``, op ``segment_attention_fused``):
``auto`` verifies and times it like the per-head op, an unbuilt backend is moved past, and padded
query rows give exactly 0 and zero gradient on every backend."""
import os

import torch

if not torch.cuda.is_available():      # the Triton kernels under the interpreter (see test_attention_triton)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from randsac_fast import ops, orders  # noqa: E402
from randsac_fast.models.randsac import split_order  # noqa: E402
from randsac_fast.ops import _dispatch, attention, selfcheck  # noqa: E402
from randsac_fast.orders import SENTINEL  # noqa: E402

BACKENDS = ["reference", "sdpa", "flex", "xformers", "triton", "cuda"]


def _load(backend):
    try:
        return attention._FUSED_TABLE[backend]()
    except ops.BackendUnavailable as e:
        pytest.skip(f"needs a CUDA device ({backend}: {e})"[:300])


@pytest.mark.parametrize("which", ["self", "cross"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_query_rows_give_zero_and_no_gradient(backend, which):
    _load(backend)
    if backend in ("cuda", "xformers") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gen = torch.Generator().manual_seed(0)
    split = split_order(orders.sample("blob:5", 2, 6, generator=gen))      # ragged: sentinel-padded rows
    enc, _, cross = split.bounds()
    bounds = enc if which == "self" else cross
    padded = bounds.seg_q >= SENTINEL
    assert bool(padded.any())
    b, nq, nk = bounds.shape
    heads, dim = 2, 16
    q = torch.randn(b, nq, (3 if which == "self" else 1) * heads * dim, generator=gen, requires_grad=True)
    kv = None if which == "self" else torch.randn(b, nk, 2 * heads * dim, generator=gen, requires_grad=True)
    fn = ops.segment_attention_qkv if which == "self" else ops.segment_attention_cross
    backward = not (backend == "flex" and not q.is_cuda)       # FlexAttention has no CPU backward
    for x in (q, kv) if not backward else ():
        if x is not None:
            x.requires_grad_(False)
    with torch.set_grad_enabled(backward):
        out = fn(q, bounds, heads, backend=backend) if which == "self" else fn(q, kv, bounds, heads, backend=backend)
    assert float(out.detach()[padded].abs().max()) == 0.0
    if not backward:
        return
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad)
    # A padded query row's own gradient (its q part) is zero: nothing flowed back through it.
    assert float(q.grad[padded][:, : heads * dim].abs().max()) == 0.0


def test_fused_op_is_registered_for_the_self_check_and_timing():
    problems = _dispatch.registered()["segment_attention_fused"]
    assert problems.timing is not None and {"triton", "cuda"} <= set(problems.fast)
    for structure in [(16, 2, "self", True, False), (16, 2, "cross", False, False), (16, 2, "self", True, True)]:
        case = problems.check(torch.device("cpu"), torch.float32, structure)
        bounds = case.inputs[2]
        assert bounds.causal == structure[4]
        if not structure[4]:
            assert bool((bounds.seg_q >= SENTINEL).any())   # padded query rows are part of the check


@pytest.mark.parametrize("kind,inclusive", [("self", True), ("cross", False)])
def test_the_check_passes_triton_and_catches_a_wrong_backend(kind, inclusive):
    selfcheck.clear()
    structure = (16, 2, kind, inclusive, False)
    for backend in ("triton",):
        verdict = _dispatch.verify("segment_attention_fused", backend, torch.device("cpu"), torch.float32, structure)
        assert verdict.ok, (backend, verdict.summary())
    fused_sdpa = attention._FUSED_TABLE["sdpa"]()

    def leaky(q_src, kv_src, bounds, heads, scale):   # padded query rows attend (the per-head adapter's old bug)
        out = fused_sdpa(q_src, kv_src, bounds, heads, scale)
        return out + (bounds.seg_q >= SENTINEL)[..., None] * 0.5
    verdict = _dispatch.verify("segment_attention_fused", "leaky", torch.device("cpu"), torch.float32, structure,
                               impl=leaky)
    assert verdict.status == "mismatch", verdict.summary()
    selfcheck.clear()


def test_auto_moves_past_an_unbuilt_cuda_extension(monkeypatch):
    """The fused cuda entry raises BackendUnavailable when loaded (extension missing), so ``auto``
    on CUDA tensors goes on to the next candidate instead of failing at the first call."""
    def missing():
        raise ops.BackendUnavailable("the CUDA extension is not built")
    monkeypatch.setitem(attention._TABLE, "cuda", missing)
    loader = attention._per_head("cuda")
    with pytest.raises(ops.BackendUnavailable, match="not built"):
        loader()
    monkeypatch.setitem(attention._FUSED_TABLE, "cuda", loader)
    monkeypatch.setitem(attention._FUSED_TABLE, "triton", missing)
    _dispatch.clear_choices()
    try:
        name = _dispatch.choose("segment_attention_fused", torch.device("cuda"), torch.float16,
                                (64, 2, "self", True, False), (1, 8, 8), ("triton", "cuda", "sdpa"))
    finally:
        _dispatch.clear_choices()
    assert name == "sdpa"


def test_auto_resolves_the_fused_op_through_the_registry(monkeypatch):
    """The models' calls reach ``choose`` with the fused op's structure (not a bare first-importable pick)."""
    seen = []
    real = _dispatch.choose

    def spy(op, device, dtype, structure, shape, order):
        seen.append((op, structure, shape))
        return real(op, device, dtype, structure, shape, order)
    monkeypatch.setattr(_dispatch, "choose", spy)
    _dispatch.clear_choices()
    gen = torch.Generator().manual_seed(0)
    enc, _, _ = split_order(orders.sample("blob:5", 2, 6, generator=gen)).bounds()
    qkv = torch.randn(*enc.shape[:2], 3 * 2 * 16, generator=gen)
    ops.segment_attention_qkv(qkv, enc, 2)
    _dispatch.clear_choices()
    assert seen == [("segment_attention_fused", (16, 2, "self", bool(enc.inclusive), bool(enc.causal)), enc.shape)]
