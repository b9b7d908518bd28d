"""Dense PyTorch reference: the definitions every fast path is checked against.

Everything here is written to be read against the papers, not to be fast. It builds explicit
(B, Nq, Nk) boolean masks, runs plain ``softmax(QK^T)V``, blurs with ``conv2d``, patchifies with a
reshape and combines skip memory with ``einsum``. All functions accept float64 inputs, which is how
the parity tests use them.

The whole-model references (:func:`randsac_loss_dense`, :func:`saim_loss_dense`) live in
:mod:`randsac_fast.models.dense`; they use these functions and work in raster token order.
"""
from __future__ import annotations


import torch
from torch import Tensor

__all__ = [
    "visibility",
    "seen_keys",
    "hide_unseen_keys",
    "segment_attention",
    "gaussian_kernel2d",
    "gaussian_blur",
    "patchify",
    "unpatchify",
    "normalize_patches",
    "patch_targets",
    "skip_memory",
    "NORM_PIX_EPS",
]

#: eps added to the (unbiased) per-patch variance, as in MAE and SAIM.
NORM_PIX_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# Masks and attention
# --------------------------------------------------------------------------------------------
def visibility(seg_q: Tensor, seg_k: Tensor, inclusive: bool) -> Tensor:
    """Which keys each query may attend to, from segment ids alone.

    seg_q: [B, Nq], seg_k: [B, Nk] (any integer dtype, any order — sortedness is only needed by
    the fast kernels). Returns a bool mask [B, Nq, Nk]:
    ``inclusive`` (encoder / "source" / content stream): key j visible iff seg_k[j] <= seg_q[i];
    strict (decoder memory / query stream): key j visible iff seg_k[j] < seg_q[i].
    """
    sq = seg_q[:, :, None]
    sk = seg_k[:, None, :]
    return sk <= sq if inclusive else sk < sq


def seen_keys(seg_q: Tensor, seg_k: Tensor, inclusive: bool) -> Tensor:
    """[B, Nk] bool: key j is visible to at least one query (any order of the ids; O(N)).

    Query i sees key j iff seg_k[j] <= seg_q[i] (< if strict), so some query sees it iff the
    comparison holds for the largest seg_q of the row."""
    if seg_q.shape[1] == 0:
        return torch.zeros(seg_k.shape, dtype=torch.bool, device=seg_k.device)
    top = seg_q.amax(dim=1, keepdim=True)
    return seg_k <= top if inclusive else seg_k < top


def hide_unseen_keys(k: Tensor, v: Tensor, seg_q: Tensor, seg_k: Tensor, inclusive: bool) -> tuple[Tensor, Tensor]:
    """k, v [B, H, Nk, D] with the keys no query sees (padding) set to 0.

    Such keys may hold anything, NaN or Inf included; a masked score or probability is 0, but
    0 * NaN is NaN, so their values must not enter a product. ``torch.where`` (not a
    multiplication) also gives them exactly zero gradient."""
    seen = seen_keys(seg_q, seg_k, inclusive)[:, None, :, None]
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    return torch.where(seen, k, zero), torch.where(seen, v, zero)


def segment_attention(q: Tensor, k: Tensor, v: Tensor, seg_q: Tensor, seg_k: Tensor, *,
                      inclusive: bool, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale + mask) v with the segment mask; fully masked rows give 0.

    q: [B, H, Nq, D], k/v: [B, H, Nk, D], seg_q: [B, Nq], seg_k: [B, Nk] -> [B, H, Nq, D].
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    mask = visibility(seg_q, seg_k, inclusive)[:, None]          # [B, 1, Nq, Nk]
    k, v = hide_unseen_keys(k, v, seg_q, seg_k, inclusive)       # padding may hold NaN / Inf
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    # A finite fill keeps fully masked rows finite (uniform) in forward *and* backward; selecting
    # with the mask (torch.where: a NaN times 0 would stay NaN) then sets them — and their
    # gradients — exactly to zero.
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.where(mask, torch.softmax(scores, dim=-1), torch.zeros((), dtype=scores.dtype, device=scores.device))
    return torch.matmul(probs, v)


# --------------------------------------------------------------------------------------------
# Targets: Gaussian blur -> patchify (p, q, c) -> per-patch normalisation
# --------------------------------------------------------------------------------------------
def gaussian_kernel2d(kernel_size: int, sigma: float, dtype=torch.float64, device=None) -> Tensor:
    """SAIM's k x k Gaussian: centre (k-1)//2, exp(-|d|^2 / (2 sigma^2)), normalised to sum 1."""
    ax = torch.arange(kernel_size, dtype=torch.float64, device=device) - (kernel_size - 1) // 2
    d2 = ax[:, None] ** 2 + ax[None, :] ** 2
    kern = torch.exp(-d2 / (2.0 * sigma * sigma))
    return (kern / kern.sum()).to(dtype)


def gaussian_blur(images: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """Depthwise 2D Gaussian blur with zero padding kernel_size // 2 (SAIM). images: [B, C, H, W]."""
    c = images.shape[1]
    kern = gaussian_kernel2d(kernel_size, sigma, images.dtype, images.device)
    weight = kern.expand(c, 1, kernel_size, kernel_size)
    return torch.nn.functional.conv2d(images, weight, padding=kernel_size // 2, groups=c)


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, N, P*P*C], tokens in raster order, pixels in (p, q, c) order."""
    b, c, h, w = images.shape
    p = patch_size
    gh, gw = h // p, w // p
    x = images.reshape(b, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> Tensor:
    """Inverse of :func:`patchify`: [B, N, P*P*C] -> [B, C, H, W]."""
    b = patches.shape[0]
    gh, gw = grid
    p = patch_size
    x = patches.reshape(b, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, gh * p, gw * p)


def normalize_patches(patches: Tensor, eps: float = NORM_PIX_EPS) -> Tensor:
    """MAE norm-pix: (x - mean) / sqrt(var + eps), unbiased var over each patch's P*P*C values."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=True)
    return (patches - mean) / torch.sqrt(var + eps)


def patch_targets(images: Tensor, patch_size: int, *, blur_kernel: int = 0, blur_sigma: float = 1.0,
                  norm_pix: bool = True, perm: Tensor | None = None) -> Tensor:
    """Regression targets [B, N, P*P*C] (rows gathered by ``perm`` [B, N'] when given).

    blur_kernel 0 (or 1) means no blur. The result keeps the input dtype here (the public op
    returns float32); call it with float64 images for a float64 reference.
    """
    x = images
    if blur_kernel and blur_kernel > 1:
        x = gaussian_blur(x, blur_kernel, blur_sigma)
    t = patchify(x, patch_size)
    if norm_pix:
        t = normalize_patches(t)
    if perm is not None:
        t = torch.gather(t, 1, perm[..., None].expand(-1, -1, t.shape[-1]))
    return t


# --------------------------------------------------------------------------------------------
# Skip memory (RandSAC A.3): Z_l = sum_k W[l, k] H_k
# --------------------------------------------------------------------------------------------
def skip_memory(hidden, weight: Tensor) -> Tensor:
    """hidden: [Lenc, B, N, D] (or a list of Lenc [B, N, D]), weight: [Ldec, Lenc] -> [Ldec, B, N, D]."""
    hidden = hidden if isinstance(hidden, Tensor) else torch.stack(list(hidden))
    return torch.einsum("lk,kbnd->lbnd", weight.to(hidden.dtype), hidden)


def attention_flops(seg_q: Tensor, seg_k: Tensor, inclusive: bool, heads: int, head_dim: int) -> int:
    """Forward FLOPs of segment attention counting only visible (query, key) pairs: 4*pairs*D*H."""
    pairs = int(visibility(seg_q, seg_k, inclusive).sum())
    return 4 * pairs * head_dim * heads

