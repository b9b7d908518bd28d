"""Triton targets (blur + patchify + norm-pix) and the fused patch loss vs the float64 reference.

Tolerance: FlashAttention's rule (``helpers.assert_close_by_rule``): the Triton result's max error
vs float64 is at most 3x that of the plain PyTorch path (``backend="reference"``, fp32 compute)
plus a tiny floor. Without a GPU the kernels run under the Triton interpreter (fp32, fp16); bf16
runs only on a GPU.
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
from randsac_fast.ops import patch_loss, patch_targets  # noqa: E402
from randsac_fast.ops.targets import _loss_torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = 1e-6  # a few fp32 ulps of O(1) values (the rule's default floor)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def images_for(p, c, dtype, seed, batch=2, grid=(2, 3)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, c, grid[0] * p, grid[1] * p, generator=g)
    return x.to(dtype).to(DEVICE)


def random_perm(batch, n, keep, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:keep] for _ in range(batch)]).to(DEVICE)


def check_targets(x, p, k, sigma, norm_pix, perm):
    kw = dict(blur_kernel=k, blur_sigma=sigma, norm_pix=norm_pix, perm=perm)
    fast = patch_targets(x, p, backend="triton", **kw)
    torch_path = patch_targets(x, p, backend="reference", **kw)
    ref = reference.patch_targets(x.double(), p, **kw)
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    assert_close_by_rule(fast, torch_path, ref, what=f"targets P={p} C={x.shape[1]} k={k} {x.dtype} norm={norm_pix}")


@pytest.mark.parametrize("p", [2, 4, 16])
@pytest.mark.parametrize("k", [0, 3, 9, 15])
@pytest.mark.parametrize("c", [1, 3])
def test_targets_match_reference(p, k, c):
    grid = (2, 1) if p == 16 else (2, 3)  # non-square images; P=16 keeps the interpreter fast
    sigma = {0: 1.0, 3: 0.6, 9: 1.5, 15: 3.0}[k]
    n = grid[0] * grid[1]
    perm = random_perm(2, n, n - 1, seed=k)
    # Each axis (dtype, norm-pix, perm) is varied at least once without the full product.
    for dtype, norm_pix, use_perm in ((torch.float32, True, False), (torch.float32, False, True),
                                      (torch.float16, True, True)):
        x = images_for(p, c, dtype, seed=p * 100 + k * 10 + c, grid=grid)
        check_targets(x, p, k, sigma, norm_pix, perm if use_perm else None)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 5.0])
def test_targets_sigma(sigma):
    x = images_for(4, 3, torch.float32, seed=7)
    check_targets(x, 4, 5, sigma, True, None)


def test_targets_strided_images():
    """A non-contiguous view (channels-last storage) gives the same targets."""
    x = images_for(4, 3, torch.float32, seed=3)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(patch_targets(x_cl, 4, blur_kernel=3, backend="triton"),
                               patch_targets(x, 4, blur_kernel=3, backend="triton"), rtol=0, atol=0)


def check_loss(x, pred, p, perm, valid, k, norm_pix, loss):
    kw = dict(blur_kernel=k, blur_sigma=1.0, norm_pix=norm_pix, loss=loss)
    pred_fast = pred.clone().requires_grad_()
    fast = patch_loss(pred_fast, x, p, perm, valid, backend="triton", **kw)
    (g_fast,) = torch.autograd.grad(fast, pred_fast)
    pred_torch = pred.clone().requires_grad_()
    torch_path = patch_loss(pred_torch, x, p, perm, valid, backend="reference", **kw)
    (g_torch,) = torch.autograd.grad(torch_path, pred_torch)
    pred_ref = pred.double().requires_grad_()
    ref = _loss_torch(pred_ref, x.double(), p, perm, valid, k, 1.0, norm_pix, loss)
    (g_ref,) = torch.autograd.grad(ref, pred_ref)
    what = f"{loss} P={p} k={k} {pred.dtype} valid={valid is not None}"
    assert fast.dtype == torch.float32 and fast.dim() == 0
    assert_close_by_rule(fast, torch_path, ref, what="loss " + what)
    assert g_fast.dtype == pred.dtype
    # Gradients are O(1 / (rows * P*P*C)): scale the floor with them.
    assert_close_by_rule(g_fast, g_torch, g_ref, what="grad " + what, floor=FLOOR * g_ref.abs().max().item())
    if valid is not None:
        assert (g_fast[~valid] == 0).all(), "padding rows must get zero gradient"


@pytest.mark.parametrize("loss", ["mse", "l1"])
@pytest.mark.parametrize("p,c,k", [(4, 3, 3), (2, 1, 0), (16, 3, 9)])
def test_loss_and_grad_match_reference(loss, p, c, k):
    grid = (2, 1) if p == 16 else (2, 3)
    n = grid[0] * grid[1]
    x = images_for(p, c, torch.float32, seed=11, grid=grid)
    perm = random_perm(2, n, n, seed=1)
    valid = torch.ones(2, n, dtype=torch.bool, device=DEVICE)
    valid[0, -1] = valid[1, 0] = False
    pred = torch.randn(2, n, p * p * c, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    check_loss(x, pred, p, perm, None, k, norm_pix=True, loss=loss)
    check_loss(x, pred, p, perm, valid, k, norm_pix=False, loss=loss)
    check_loss(x, pred.half(), p, perm, valid, k, norm_pix=True, loss=loss)


def test_loss_ignores_padding_rows():
    """Whatever a padding row holds, it adds nothing to the loss (and gets zero gradient)."""
    x = images_for(4, 3, torch.float32, seed=2)
    perm = random_perm(2, 6, 4, seed=2)
    valid = torch.tensor([[True, True, False, False], [True, False, True, False]], device=DEVICE)
    pred = torch.randn(2, 4, 48, device=DEVICE)
    garbage = pred.clone()
    garbage[~valid] = float("nan")
    garbage.requires_grad_()
    a = patch_loss(pred, x, 4, perm, valid, blur_kernel=3, backend="triton")
    b = patch_loss(garbage, x, 4, perm, valid, blur_kernel=3, backend="triton")
    assert torch.equal(a, b)
    (g,) = torch.autograd.grad(b, garbage)
    assert torch.isfinite(g).all() and (g[~valid] == 0).all()


# --- clear errors (through the public ops) ----------------------------------------------------
def test_errors():
    x = images_for(4, 3, torch.float32, seed=0)                      # [2, 3, 8, 12]
    perm = random_perm(2, 6, 6, seed=0)
    pred = torch.zeros(2, 6, 48, device=DEVICE)
    with pytest.raises(ValueError, match="width 12 is not divisible by patch size 8"):
        patch_targets(x, 8, backend="triton")
    with pytest.raises(ValueError, match="blur_kernel must be 0 .* odd size"):
        patch_targets(x, 4, blur_kernel=4, backend="triton")
    with pytest.raises(TypeError, match="floating point"):
        patch_targets((x * 255).to(torch.uint8), 4, backend="triton")
    with pytest.raises(ValueError, match="perm must be int64"):
        patch_targets(x, 4, perm=perm.int(), backend="triton")
    with pytest.raises(ValueError, match=r"pred must be \[B, N', P\*P\*C\] = \[2, 6, 48\]"):
        patch_loss(pred[..., :47], x, 4, perm, backend="triton")
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        patch_loss(pred, x, 4, perm, torch.ones(2, 6, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="loss must be 'mse' or 'l1'"):
        patch_loss(pred, x, 4, perm, loss="huber", backend="triton")


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        patch_targets(x, 4, backend="triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        patch_loss(torch.zeros(1, 4, 48), x, 4, torch.zeros(1, 4, dtype=torch.long), backend="triton")


def test_missing_triton_is_a_clear_error(monkeypatch):
    """Without triton the backend's loader reports what is missing (BackendUnavailable)."""
    import sys

    import randsac_fast.kernels
    from randsac_fast.ops._dispatch import BackendUnavailable, lazy
    monkeypatch.setitem(sys.modules, "triton", None)            # makes `import triton` fail
    for name in ("randsac_fast.kernels.triton_targets", "randsac_fast.ops.targets_triton"):
        monkeypatch.delitem(sys.modules, name, raising=False)   # restored after the test
    monkeypatch.delattr(randsac_fast.kernels, "triton_targets", raising=False)
    with pytest.raises(BackendUnavailable, match="needs the triton package: pip install triton"):
        lazy("ops.targets_triton", "patch_targets_triton")()   # a fresh loader: the table's is cached


# --- GPU only ---------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("k", [0, 9])
def test_targets_and_loss_bf16(k):
    x = images_for(16, 3, torch.bfloat16, seed=4, grid=(3, 2))
    perm = random_perm(2, 6, 5, seed=4)
    check_targets(x, 16, k, 1.0, True, perm)
    valid = torch.tensor([[True] * 4 + [False], [False] + [True] * 4], device=DEVICE)
    pred = torch.randn(2, 5, 768, device=DEVICE).bfloat16()
    for loss in ("mse", "l1"):
        check_loss(x, pred, 16, perm, valid, k, norm_pix=True, loss=loss)


def test_opcheck():
    """Schema, fake-tensor, autograd registration and AOT dispatch of the registered ops."""
    from torch.library import opcheck

    import randsac_fast.ops.targets_triton  # noqa: F401  (registers the ops)
    x = images_for(4, 3, torch.float32, seed=0)
    perm = random_perm(2, 6, 5, seed=0)
    valid = torch.tensor([[True] * 4 + [False]] * 2, device=DEVICE)
    pred = torch.randn(2, 5, 48, device=DEVICE, requires_grad=True)
    ops = torch.ops.randsac_fast
    opcheck(ops.patch_targets_triton.default, (x, perm, 4, 3, 1.0, True))
    opcheck(ops.patch_targets_triton.default, (x, None, 4, 0, 1.0, False))
    opcheck(ops.patch_loss_triton.default, (pred, x, perm, valid, 4, 3, 1.0, True, "mse"))
    opcheck(ops.patch_loss_triton.default, (pred, x, perm, None, 4, 0, 1.0, True, "l1"))


def test_compile_fullgraph():
    """torch.compile sees the loss as one op: same value and gradient as eager, no graph break."""
    x = images_for(4, 3, torch.float32, seed=0)
    perm = random_perm(2, 6, 5, seed=0)
    valid = torch.tensor([[True] * 4 + [False]] * 2, device=DEVICE)
    pred = torch.randn(2, 5, 48, device=DEVICE, requires_grad=True)

    def step(pred):
        return patch_loss(pred, x, 4, perm, valid, blur_kernel=3, backend="triton")

    eager = step(pred)                 # the eager call also loads the backend (no import under dynamo)
    compiled = torch.compile(step, fullgraph=True)(pred)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(compiled, pred)[0], torch.autograd.grad(eager, pred)[0],
                               rtol=0, atol=0)
