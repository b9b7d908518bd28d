"""Triton skip memory (Z_l = sum_k W[l, k] H_k) and its one-pass backward vs the float64 reference.

Tolerance: FlashAttention's rule (``helpers.assert_close_by_rule``): the Triton error vs float64 is
at most 3x plain PyTorch's (einsum in the same dtype) plus a tiny floor. CPU runs use the Triton interpreter; bf16 runs only on a GPU.
"""
import os

import torch

# triton.jit picks interpreter vs compiler when a kernel is defined: set the switch before the
# kernels are imported, and only without CUDA (on a GPU the kernels must stay compiled).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton", reason="needs triton")

from helpers import assert_close_by_rule  # noqa: E402

from randsac_fast import reference  # noqa: E402
from randsac_fast.ops import skip_memory  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def value_and_grads(fn, hidden, weight, grad_out):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    z = fn(hidden, weight)
    dh, dw = torch.autograd.grad(z, (hidden, weight), grad_out.to(z.dtype))
    return z, dh, dw


def check(shape, ldec, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, generator=g).to(dtype).to(DEVICE)
    weight = torch.randn(ldec, shape[0], generator=g).to(DEVICE)
    grad_out = torch.randn(ldec, *shape[1:], generator=g).to(dtype).to(DEVICE)
    fast = value_and_grads(lambda h, w: skip_memory(h, w, backend="triton"), hidden, weight, grad_out)
    torch_path = value_and_grads(reference.skip_memory, hidden, weight, grad_out)
    ref = value_and_grads(reference.skip_memory, hidden.double(), weight.double(), grad_out.double())
    assert fast[0].dtype == dtype and fast[1].dtype == dtype and fast[2].dtype == weight.dtype
    assert fast[0].shape == (ldec, *shape[1:])
    floor = 4 * torch.finfo(torch.float32).eps
    for name, f, t, r in zip(("Z", "dH", "dW"), fast, torch_path, ref):
        assert_close_by_rule(f, t, r, what=f"{name} {shape} Ldec={ldec} {dtype}",
                             floor=floor * r.abs().max().item())
    return fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,ldec", [((12, 2, 5, 24), 8), ((3, 1, 7, 5), 1), ((1, 2, 3, 4), 5),
                                        ((5, 1, 3, 700), 3)])
def test_skip_memory_matches_reference(shape, ldec, dtype):
    check(shape, ldec, dtype)


def test_backward_many_blocks_per_program_is_deterministic(monkeypatch):
    """With fewer programs than blocks each program loops; dW is bitwise reproducible."""
    from randsac_fast.kernels import triton_skip
    monkeypatch.setattr(triton_skip, "MAX_BWD_PROGRAMS", 2)
    shape = (4, 1, 5, triton_skip.BLOCK + 17)     # M = 5 * (BLOCK + 17): 6 blocks on 2 programs
    first = check(shape, 3, torch.float32, seed=1)
    again = check(shape, 3, torch.float32, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_list_of_states_matches_float64(dtype):
    """The model's call: Lenc separate [B, N, D] states (no stack). Values and per-state gradients
    match the float64 reference by the rule, and nothing copies the states into one buffer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(5)
    lenc, ldec, shape = 4, 3, (2, 5, 24)
    states = [torch.randn(*shape, generator=g).to(dtype).to(DEVICE) for _ in range(lenc)]
    weight = torch.randn(ldec, lenc, generator=g).to(DEVICE)
    grad_out = torch.randn(ldec, *shape, generator=g).to(dtype).to(DEVICE)

    class Ops(TorchDispatchMode):
        names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def run(fn, hs, w):
        hs = [h.detach().requires_grad_() for h in hs]
        w = w.detach().requires_grad_()
        z = fn(hs, w)
        return (z, *torch.autograd.grad(z, (*hs, w), grad_out.to(z.dtype)))

    with Ops() as mode:
        fast = run(lambda hs, w: skip_memory(hs, w, backend="triton"), states, weight)
    assert not {"stack", "cat", "copy_", "clone"} & set(mode.names), mode.names
    plain = run(reference.skip_memory, states, weight)
    ref = run(reference.skip_memory, [h.double() for h in states], weight.double())
    floor = 4 * torch.finfo(torch.float32).eps
    names = ["Z", *(f"dH[{k}]" for k in range(lenc)), "dW"]
    for name, f, t, r in zip(names, fast, plain, ref):
        assert f.dtype == t.dtype
        assert_close_by_rule(f, t, r, what=f"list {name} {dtype}", floor=floor * r.abs().max().item())


def test_non_contiguous_hidden():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 4, 3, 6, generator=g).to(DEVICE).transpose(0, 1)   # [4, 2, 3, 6] view
    weight = torch.randn(3, 4, generator=g).to(DEVICE)
    torch.testing.assert_close(skip_memory(hidden, weight, backend="triton"),
                               reference.skip_memory(hidden, weight))


def test_errors(monkeypatch):
    hidden = torch.zeros(4, 2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"hidden must be \[Lenc, B, N, D\]"):
        skip_memory(hidden[0], torch.zeros(2, 4, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="weight must be .* Lenc = 4"):
        skip_memory(hidden, torch.zeros(2, 3, device=DEVICE), backend="triton")
    with pytest.raises(TypeError, match="floating point"):
        skip_memory(hidden.long(), torch.zeros(2, 4, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="list of \\[B, N, D\\] tensors of one shape"):
        skip_memory([hidden[0], hidden[1, :, :2]], torch.zeros(2, 2, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="share one dtype"):
        skip_memory([hidden[0], hidden[1].half()], torch.zeros(2, 2, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="Lenc = 2"):
        skip_memory([hidden[0], hidden[1]], torch.zeros(2, 4, device=DEVICE), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        skip_memory(torch.zeros(4, 2, 3, 8), torch.zeros(2, 4), backend="triton")


def test_opcheck():
    from torch.library import opcheck

    import randsac_fast.ops.skip_triton  # noqa: F401  (registers the ops)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 2, 4, 8, generator=g).to(DEVICE).requires_grad_()
    weight = torch.randn(2, 3, generator=g).to(DEVICE).requires_grad_()
    states = [h.detach().requires_grad_() for h in hidden.unbind(0)]
    opcheck(torch.ops.randsac_fast.skip_memory_triton.default, (states, weight))


@needs_cuda
def test_skip_memory_bf16():
    check((12, 2, 7, 64), 8, torch.bfloat16)


def test_compile_fullgraph():
    """torch.compile sees one op (no graph break) with the eager values and gradients."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 2, 4, 8, generator=g).to(DEVICE).requires_grad_()
    weight = torch.randn(2, 3, generator=g).to(DEVICE).requires_grad_()

    def memory(hidden, weight):
        return skip_memory(hidden, weight, backend="triton")

    eager = memory(hidden, weight)     # the eager call also loads the backend (no import under dynamo)
    compiled = torch.compile(memory, fullgraph=True)(hidden, weight)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    ge = torch.autograd.grad(eager.sum(), (hidden, weight))
    gc = torch.autograd.grad(compiled.sum(), (hidden, weight))
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
