"""Seeded parity fuzzing of the kernels against float64: a few hundred random cases, fast.

Random shapes, head dims and segment structures — compact segments, empty segments (gaps in the
ids), decoder-style shifted queries (Nq != Nk, the first segment fully masked under the strict
rule), right padding with a sentinel id, all tokens in one segment — inclusive and strict, fp32
and fp16, for ``segment_attention`` forward and backward (reference, sdpa, triton), and for
``patch_targets`` / ``patch_loss`` / ``skip_memory`` (triton). A third of the attention cases
(half of the Triton ones) put NaN / Inf into the keys no query sees: the outputs and gradients
must still match the clean float64 reference (and those keys' gradients must be 0).

Tolerance: FlashAttention's rule (``helpers.assert_close_by_rule``): error vs float64 at most 3x
plain PyTorch's in the same dtype, plus a floor. Without a GPU, Triton runs under the interpreter
(fp32 / fp16, small shapes: it runs one program at a time).
"""
import os
import random

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from helpers import assert_close_by_rule, random_seg  # noqa: E402
from randsac_fast import ops, reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SENTINEL = 1 << 20
ATTN_FLOOR = 2e-5   # fp32 rounding of FA2's dS = P (dP - delta) (see test_attention_triton.FLOOR)


# --------------------------------------------------------------------------------------------
# segment_attention
# --------------------------------------------------------------------------------------------
def _sorted_ids(gen, b, n, high):
    return torch.sort(torch.randint(0, high, (b, n), generator=gen), dim=1).values.to(torch.int32)


def segments(rng: random.Random, gen: torch.Generator, b: int, nq: int, nk: int):
    """(seg_q [B, Nq], seg_k [B, Nk], structure name), sorted rows."""
    kind = rng.choices(["compact", "gaps", "decoder", "padded", "one"], weights=[2, 2, 2, 3, 1])[0]
    if kind == "compact":
        sk = random_seg(b, nk, rng.randint(1, max(1, nk)), gen)
        sq = sk if nq == nk else random_seg(b, nq, rng.randint(1, max(1, nq)), gen)
    elif kind == "gaps":            # ids skip values: segments with no tokens in q or in k
        high = rng.randint(2, 2 * max(nq, nk))
        sq, sk = _sorted_ids(gen, b, nq, high), _sorted_ids(gen, b, nk, high)
    elif kind == "decoder":         # queries: segments 1..S, keys: 0..S-1 (RandSAC's decoder)
        sk = random_seg(b, nk, rng.randint(1, max(1, nk)), gen)
        sq = _sorted_ids(gen, b, nq, int(sk.max()) + 1) + 1
    elif kind == "padded":          # right padding with a sentinel id in both
        sq, sk = random_seg(b, nq, 4, gen), random_seg(b, nk, 4, gen)
        for s in (sq, sk):
            for row in range(b):
                pad = rng.randint(0, s.shape[1] // 2)
                if pad:
                    s[row, -pad:] = SENTINEL
    else:
        sq, sk = torch.zeros(b, nq, dtype=torch.int32), torch.zeros(b, nk, dtype=torch.int32)
    return sq, sk, kind


def _attention(q, k, v, sq, sk, inclusive, backend, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = ops.segment_attention(q, k, v, sq.to(q.device), sk.to(q.device), inclusive=inclusive, backend=backend)
    return (out, *torch.autograd.grad(out, (q, k, v), do.to(out.dtype)))


def _attention_case(index: int, triton: bool):
    rng = random.Random(1000 * triton + index)
    gen = torch.Generator().manual_seed(1000 * triton + index)
    if triton:   # the interpreter runs one program at a time: keep it to a few tiles
        b, h, nq, nk, d = rng.randint(1, 2), 1, rng.randint(1, 40), rng.randint(1, 40), rng.choice([8, 16, 24])
    else:
        b, h = rng.randint(1, 3), rng.randint(1, 3)
        nq, nk, d = rng.randint(1, 48), rng.randint(1, 48), rng.choice([4, 8, 16, 32, 64, 80])
    if rng.random() < 0.3:
        nk = nq
    sq, sk, kind = segments(rng, gen, b, nq, nk)
    dtype = rng.choice([torch.float32, torch.float16])
    inclusive = rng.random() < 0.5
    garbage = rng.random() < (1 / 2 if triton else 1 / 3)
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(dtype) for n in (nq, nk, nk))
    do = torch.randn(b, h, nq, d, generator=gen, dtype=torch.float64)
    what = f"case {index}: B={b} H={h} Nq={nq} Nk={nk} D={d} {kind} {dtype} inclusive={inclusive} garbage={garbage}"
    return (q, k, v, sq, sk, inclusive, do, garbage), what


def _check_attention(args, what, backend):
    q, k, v, sq, sk, inclusive, do, garbage = args
    q, k, v, do = (t.to(DEVICE) for t in (q, k, v, do))
    ref = _attention(q.double(), k.double(), v.double(), sq, sk, inclusive, "reference", do)
    plain = _attention(q, k, v, sq, sk, inclusive, "reference", do)
    unseen = ~reference.seen_keys(sq, sk, inclusive).to(DEVICE)[:, None, :, None]
    if garbage:     # keys no query sees hold NaN / Inf: nothing may change
        k = torch.where(unseen, torch.tensor(float("nan"), dtype=k.dtype, device=k.device), k)
        v = torch.where(unseen, torch.tensor(float("inf"), dtype=v.dtype, device=v.device), v)
    fast = _attention(q, k, v, sq, sk, inclusive, backend, do)
    for name, f, p, r in zip(("out", "dq", "dk", "dv"), fast, plain, ref):
        assert f.dtype == q.dtype and f.shape == r.shape
        assert_close_by_rule(f, p, r, floor=ATTN_FLOOR, what=f"{backend} {name} {what}")
    for name, g in (("dk", fast[2]), ("dv", fast[3])):
        assert not g.masked_select(unseen.expand_as(g)).any(), f"{backend} {name}: a key no query sees got gradient"


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("index", range(100))
def test_attention_fuzz(backend, index):
    args, what = _attention_case(index, triton=False)
    if backend == "reference":   # plain PyTorch in the same dtype here is the naive softmax: compare to it
        _check_reference_against_naive(args, what)
    else:
        _check_attention(args, what, backend)


def _naive(q, k, v, sq, sk, inclusive):
    """Textbook masked softmax(q k^T / sqrt(D)) v in q's dtype; fully masked rows 0."""
    mask = reference.visibility(sq, sk, inclusive)[:, None]
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return p @ v


def _check_reference_against_naive(args, what):
    q, k, v, sq, sk, inclusive, do, garbage = args
    ref = _naive(q.double(), k.double(), v.double(), sq, sk, inclusive)
    plain = _naive(q, k, v, sq, sk, inclusive)
    unseen = ~reference.seen_keys(sq, sk, inclusive)[:, None, :, None]
    if garbage:
        k = torch.where(unseen, torch.tensor(float("nan"), dtype=k.dtype), k)
        v = torch.where(unseen, torch.tensor(float("inf"), dtype=v.dtype), v)
    fast = ops.segment_attention(q, k, v, sq, sk, inclusive=inclusive, backend="reference")
    assert_close_by_rule(fast, plain, ref, floor=ATTN_FLOOR, what=f"reference out {what}")


@pytest.mark.parametrize("index", range(12))
def test_attention_fuzz_triton(index):
    pytest.importorskip("triton", reason="needs triton (pip install '.[triton]')")
    args, what = _attention_case(index, triton=True)
    _check_attention(args, what, "triton")


# --------------------------------------------------------------------------------------------
# patch_targets / patch_loss / skip_memory (triton vs float64, plain = the reference backend)
# --------------------------------------------------------------------------------------------
def _target_case(index: int):
    rng = random.Random(2000 + index)
    gen = torch.Generator().manual_seed(2000 + index)
    p, c = rng.choice([1, 2, 4]), rng.choice([1, 3])
    gh, gw, b = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 2)
    k = rng.choice([0, 3, 5])
    norm_pix = p * p * c >= 2 and rng.random() < 0.7
    dtype = rng.choice([torch.float32, torch.float16])
    images = torch.rand(b, c, gh * p, gw * p, generator=gen).to(dtype).to(DEVICE)
    n = gh * gw
    keep = rng.randint(1, n)
    perm = torch.stack([torch.randperm(n, generator=gen)[:keep] for _ in range(b)]).to(DEVICE)
    kw = dict(blur_kernel=k, blur_sigma=rng.uniform(0.5, 2.0), norm_pix=norm_pix)
    return rng, gen, images, p, perm, kw, f"case {index}: {tuple(images.shape)} P={p} {kw} {dtype}"


@pytest.mark.parametrize("index", range(6))
def test_patch_targets_fuzz_triton(index):
    pytest.importorskip("triton", reason="needs triton (pip install '.[triton]')")
    _, _, images, p, perm, kw, what = _target_case(index)
    fast = ops.patch_targets(images, p, perm=perm, backend="triton", **kw)
    plain = ops.patch_targets(images, p, perm=perm, backend="reference", **kw)
    ref = reference.patch_targets(images.double(), p, perm=perm, **kw)
    assert_close_by_rule(fast, plain, ref, what="targets " + what)


@pytest.mark.parametrize("index", range(6))
def test_patch_loss_fuzz_triton(index):
    pytest.importorskip("triton", reason="needs triton (pip install '.[triton]')")
    rng, gen, images, p, perm, kw, what = _target_case(100 + index)
    loss = rng.choice(["mse", "l1"])
    valid = (torch.rand(perm.shape, generator=gen) < 0.7).to(DEVICE) if rng.random() < 0.5 else None
    pred = torch.randn(*perm.shape, p * p * images.shape[1], generator=gen).to(DEVICE)

    def value_and_grad(fn, x):
        x = x.detach().requires_grad_()
        out = fn(x)
        return out, torch.autograd.grad(out, x)[0]
    fast = value_and_grad(lambda x: ops.patch_loss(x, images, p, perm, valid, loss=loss, backend="triton", **kw), pred)
    plain = value_and_grad(lambda x: ops.patch_loss(x, images, p, perm, valid, loss=loss, backend="reference", **kw),
                           pred)
    ref = value_and_grad(lambda x: ops.masked_patch_loss(x, reference.patch_targets(images.double(), p, perm=perm, **kw),
                                                         valid, loss), pred.double())
    assert_close_by_rule(fast[0], plain[0], ref[0], what=f"loss {loss} {what}")
    assert_close_by_rule(fast[1], plain[1], ref[1], what=f"dpred {loss} {what}",
                         floor=1e-6 * ref[1].abs().max().item())


@pytest.mark.parametrize("index", range(6))
def test_skip_memory_fuzz_triton(index):
    pytest.importorskip("triton", reason="needs triton (pip install '.[triton]')")
    rng = random.Random(3000 + index)
    gen = torch.Generator().manual_seed(3000 + index)
    lenc, ldec = rng.randint(1, 6), rng.randint(1, 5)
    shape = (lenc, rng.randint(1, 2), rng.randint(1, 9), rng.choice([1, 8, 24]))
    dtype = rng.choice([torch.float32, torch.float16])
    hidden = torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)
    weight = torch.randn(ldec, lenc, generator=gen).to(DEVICE)
    grad = torch.randn(ldec, *shape[1:], generator=gen).to(DEVICE)

    def run(fn, h, w):
        h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
        z = fn(h, w)
        return (z, *torch.autograd.grad(z, (h, w), grad.to(z.dtype)))
    fast = run(lambda h, w: ops.skip_memory(h, w, backend="triton"), hidden, weight)
    plain = run(reference.skip_memory, hidden, weight)
    ref = run(reference.skip_memory, hidden.double(), weight.double())
    for name, f, t, r in zip(("Z", "dH", "dW"), fast, plain, ref):
        assert_close_by_rule(f, t, r, what=f"skip {name} {shape} Ldec={ldec} {dtype}",
                             floor=4 * torch.finfo(torch.float32).eps * r.abs().max().item())
