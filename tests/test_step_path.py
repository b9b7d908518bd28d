"""The GPU-shaped training step: bounds once per forward, the fused-qkv layout, static shapes,
no host syncs, the SAIM causal path, and one compiled graph with no recompiles."""
import importlib
import os

import torch

if not torch.cuda.is_available():      # the Triton kernels under the interpreter (see test_attention_triton)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from randsac_fast import models, ops, orders, reference  # noqa: E402
from randsac_fast.kernels import triton_attention as kernels  # noqa: E402
from randsac_fast.models.randsac import split_order  # noqa: E402
from randsac_fast.ops.attention import _heads, _merge  # noqa: E402
from randsac_fast.orders import SENTINEL  # noqa: E402

if not torch.cuda.is_available() and not kernels.INTERPRET:
    importlib.reload(kernels)

TINY = dict(img_size=16, patch_size=2, embed_dim=32, depth=2, num_heads=2)


def test_bounds_are_the_mask_prefixes_with_padded_queries_seeing_nothing():
    seg_q = torch.tensor([[0, 0, 1, 2, 2, SENTINEL, SENTINEL], [1, 1, 1, 2, 3, 3, 3]], dtype=torch.int32)
    seg_k = torch.tensor([[0, 1, 1, 2, SENTINEL], [0, 0, 1, 1, 2]], dtype=torch.int32)
    for inclusive in (True, False):
        b = ops.segment_bounds(seg_q, seg_k, inclusive)
        mask = reference.visibility(seg_q, seg_k, inclusive) & (seg_q < SENTINEL)[..., None]
        assert torch.equal(b.mask(), mask)
        first = torch.where(mask.any(1), mask.int().argmax(1), torch.full((2, 5), 7))
        assert torch.equal(b.q_start, first.int())
        assert torch.equal(b.visible_pairs(), mask.sum((1, 2)))


def test_causal_declaration_is_checked():
    seg = torch.arange(5, dtype=torch.int32)[None]
    assert torch.equal(ops.segment_bounds(seg, seg, True, causal=True).kv_len,
                       ops.segment_bounds(seg, seg, True).kv_len)
    with pytest.raises(ValueError, match="causal=True was declared"):
        ops.segment_bounds(seg // 2, seg // 2, True, causal=True)


def _fused_case(which: str, bounds, heads: int, dim: int, gen):
    b, nq, nk = bounds.shape
    if which == "self":
        return (torch.randn(b, nq, 3 * heads * dim, generator=gen, dtype=torch.float64),)
    return (torch.randn(b, nq, heads * dim, generator=gen, dtype=torch.float64),
            torch.randn(b, nk, 2 * heads * dim, generator=gen, dtype=torch.float64))


def _run(which, args, bounds, heads, backend, dtype):
    leaves = [a.detach().to(dtype).clone().requires_grad_() for a in args]
    fn = ops.segment_attention_qkv if which == "self" else ops.segment_attention_cross
    out = fn(*leaves, bounds, heads, backend=backend)
    return out, leaves


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("which", ["self", "cross"])
@pytest.mark.parametrize("heads,dim", [(2, 16), (4, 48)])    # (4, 48): rows wider than one head's 128 limit
def test_fused_layout_matches_float64_reference(backend, which, heads, dim):
    """Fused [B, N, 3*H*D] in, [B, N, H*D] out, one gradient buffer per input; error vs float64
    within a small multiple of the per-head fp32 reference's error (FlashAttention rule)."""
    gen = torch.Generator().manual_seed(0)
    split = split_order(orders.sample("blob:5", 2, 6, generator=gen))       # padded: sentinel rows
    enc, _, cross = split.bounds()
    bounds = enc if which == "self" else cross
    args = _fused_case(which, bounds, heads, dim, gen)
    grad = torch.randn(*bounds.shape[:2], heads * dim, generator=gen, dtype=torch.float64)

    def per_head(dtype):   # plain PyTorch on per-head views: the dense definition
        leaves = [a.detach().to(dtype).clone().requires_grad_() for a in args]
        q, k, v = (_heads(leaves[0], 3, heads) if which == "self"
                   else _heads(leaves[0], 1, heads) + _heads(leaves[1], 2, heads))
        seg_q = torch.where(bounds.seg_q >= SENTINEL, -1, bounds.seg_q)
        out = _merge(reference.segment_attention(q, k, v, seg_q, bounds.seg_k, inclusive=bounds.inclusive))
        out.backward(grad.to(dtype))
        return out, [x.grad for x in leaves]

    exact, exact_g = per_head(torch.float64)
    plain, plain_g = per_head(torch.float32)
    out, leaves = _run(which, args, bounds, heads, backend, torch.float32)
    out.backward(grad.float())
    assert out.shape == (*bounds.shape[:2], heads * dim)
    padded = bounds.kv_len == 0
    assert bool(padded.any()) and float(out.detach()[padded].abs().max()) == 0.0     # rows that see nothing: 0
    for got, ref, base in [(out, exact, plain)] + list(zip([x.grad for x in leaves], exact_g, plain_g)):
        err = (got.double() - ref).abs().max().item()
        base_err = (base.double() - ref).abs().max().item()
        assert err <= 4 * base_err + 1e-6, (err, base_err)


def test_split_never_syncs_and_blob_shapes_are_static():
    """Blob orders pad to N - 1 whatever the sample; squares slice by the host-known size."""
    gen = torch.Generator().manual_seed(1)
    shapes = {tuple(split_order(orders.sample("blob:11/5", 3, 12, generator=gen)).dec_seg.shape) for _ in range(10)}
    assert shapes == {(3, 143)}
    sq = split_order(orders.sample("square:16/4", 3, 12, generator=gen))
    assert sq.enc_seg.shape == (3, 144 - 9) and sq.dec_valid is None
    ops.set_checks(False)
    try:   # a host read (item / tolist / bool) of a tensor would raise under this mode
        from torch._subclasses.fake_tensor import FakeTensorMode
        order = orders.sample("blob:11/5", 2, 12, generator=gen)
        with FakeTensorMode(allow_non_fake_inputs=True):
            split = split_order(order)
            split.bounds()
    finally:
        ops.set_checks(True)


def test_saim_causal_backend_matches_masked():
    """SAIM's one-token segments declared causal: SDPA is_causal (no mask) == the masked path."""
    torch.manual_seed(0)
    model = models.build("saim_vit_tiny", **TINY, query_depth=2, backend="sdpa").double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    order = orders.sample("random", 2, model.grid, generator=torch.Generator().manual_seed(2))
    assert all(b.causal for b in model.bounds(order))
    losses, grads = [], []
    for backend in ("sdpa", "sdpa_causal"):
        models.vit.set_backend(model, backend)
        model.zero_grad()
        loss = model(x, order)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which,specs", [("randsac", ("square:16", "blob:6/3", "random")), ("saim", ("random",))])
def test_whole_forward_compiles_once_without_breaks(which, specs):
    """fullgraph compile of forward + loss: 0 graph breaks, 0 recompiles over 5 batches per family."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    extra = dict(decoder_depth=1, skip_memory=True) if which == "randsac" else dict(query_depth=1)
    model = models.build(f"{which}_vit_tiny", **TINY, **extra, backend="sdpa")
    x = torch.randn(2, 3, 16, 16)
    gen = torch.Generator().manual_seed(3)
    ops.set_checks(False)
    try:
        for spec in specs:
            torch._dynamo.reset()
            counters.clear()
            step = torch.compile(model, fullgraph=True, backend="aot_eager")
            for _ in range(5):
                step(x, orders.sample(spec, 2, model.grid, generator=gen)).backward()
            assert not counters["graph_break"], dict(counters["graph_break"])
            # a recompile (new shapes, a changed guard) would add a graph
            assert counters["stats"]["unique_graphs"] == 1, (spec, dict(counters["stats"]))
            assert counters["aot_autograd"]["total"] == 1, (spec, dict(counters["aot_autograd"]))
    finally:
        ops.set_checks(True)


def test_compile_modes_and_legacy_values():
    from randsac_fast.runtime.parallel import compile_mode
    assert [compile_mode(v) for v in (True, False, "true", "whole", "block")] == ["block", "none", "block", "whole",
                                                                                 "block"]
    with pytest.raises(ValueError, match="--compile must be one of none, block, whole, whole-cudagraphs; got 'all'"):
        compile_mode("all")


@pytest.mark.parametrize("which,spec", [("randsac", "square:4"), ("randsac", "blob:6/3"), ("saim", "random")])
def test_triton_model_matches_float64(which, spec):
    """The whole model on the Triton fused-layout kernels (padded blob rows, SAIM's causal bounds):
    loss and every gradient vs float64, within a small multiple of plain fp32 PyTorch's error."""
    torch.manual_seed(0)
    extra = dict(decoder_depth=1, skip_memory=True) if which == "randsac" else dict(query_depth=1)
    model = models.build(f"{which}_vit_tiny", **TINY, **extra, backend="sdpa")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    order = orders.sample(spec, 2, model.grid, generator=torch.Generator().manual_seed(4))

    def run(backend, dtype):
        m = model.to(dtype)
        models.vit.set_backend(m, backend)
        m.zero_grad()
        loss = m(x.to(dtype), order)
        loss.backward()
        return [loss.detach().double()] + [p.grad.double().clone() for p in m.parameters()]

    exact = run("sdpa", torch.float64)
    plain = run("sdpa", torch.float32)
    fast = run("triton", torch.float32)
    for got, base, ref in zip(fast, plain, exact):
        err, base_err = (got - ref).abs().max().item(), (base - ref).abs().max().item()
        assert err <= 4 * base_err + 1e-6, (err, base_err)
