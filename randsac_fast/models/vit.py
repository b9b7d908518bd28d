"""ViT building blocks shared by RandSAC and SAIM.

Pre-norm blocks (LayerNorm eps 1e-6), fused qkv projection with bias, GELU MLP, fixed 2D sin-cos
position embeddings (MAE's construction). Attention goes through
:func:`randsac_fast.ops.segment_attention_qkv` / ``segment_attention_cross`` straight from the
projection's [B, N, 3*D] layout, with the :class:`~randsac_fast.ops.SegmentBounds` of the current
(permuted) sequence, built once per forward; there are no dense masks here.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import SegmentBounds, segment_attention_cross, segment_attention_qkv, segment_bounds

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


# --------------------------------------------------------------------------------------------
# Position embeddings (MAE): half the channels encode the column, half the row
# --------------------------------------------------------------------------------------------
def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, dim]: sin | cos of pos * 1 / 10000^(2i/dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> np.ndarray:
    """[grid_h * grid_w (+1), dim] fixed embeddings in raster order; the cls row (first) is zero."""
    if dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for 2D sin-cos embeddings; got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                             indexing="ij")
    emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return emb


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, N, D] tokens in raster order (a conv with kernel = stride = P)."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        h, w = img_size
        for side, size in (("height", h), ("width", w)):
            if size % patch_size:
                raise ValueError(f"image {side} {size} is not divisible by patch size {patch_size}; "
                                 f"use an image size that is a multiple of {patch_size}")
        self.img_size = (h, w)
        self.patch_size = patch_size
        self.grid = (h // patch_size, w // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or tuple(images.shape[-2:]) != self.img_size or images.shape[1] != self.proj.in_channels:
            raise ValueError(f"images must be [B, {self.proj.in_channels}, {self.img_size[0]}, {self.img_size[1]}]; "
                             f"got {tuple(images.shape)} — resize the inputs or build the model with that img_size")
        # The pixels arrive in fp32 (the targets are computed from them, as in MAE); the projection
        # reads them in its own dtype (bf16 under master weights / FSDP2 mixed precision).
        return self.proj(images.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention with a fused qkv projection; self- or cross-attention by segment ids."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}; {heads_fix(dim, num_heads)}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, bounds: SegmentBounds) -> Tensor:
        """Self-attention. x: [B, N, D], bounds for (seg, seg) -> [B, N, D]."""
        out = segment_attention_qkv(self.qkv(x), bounds, self.num_heads, backend=self.backend)
        return self.proj(out)

    def cross(self, x: Tensor, mem: Tensor, bounds: SegmentBounds) -> Tensor:
        """Cross-attention: queries from x [B, Nq, D], keys/values from mem [B, Nk, D]."""
        d = x.shape[-1]
        # split (not two slices): the backward joins the two weight gradients with one cat instead
        # of zero-filling a full-size gradient per slice and adding them
        w_q, w_kv = self.qkv.weight.split((d, 2 * d))
        b_q, b_kv = self.qkv.bias.split((d, 2 * d))
        q = F.linear(x, w_q, b_q)
        kv = F.linear(mem, w_kv, b_kv)
        return self.proj(segment_attention_cross(q, kv, bounds, self.num_heads, backend=self.backend))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block. ``forward``: masked self-attention (encoder / content stream).
    ``cross``: SAIM's query-stream use of a block — queries g attend to the content states h, both
    through the same ``norm1`` (as in SAIM's official blocks)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, backend: str = "auto"):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, backend)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, bounds: SegmentBounds) -> Tensor:
        x = x + self.attn(self.norm1(x), bounds)
        return x + self.mlp(self.norm2(x))

    def cross(self, g: Tensor, h: Tensor, bounds: SegmentBounds) -> Tensor:
        g = g + self.attn.cross(self.norm1(g), self.norm1(h), bounds)
        return g + self.mlp(self.norm2(g))


class DecoderBlock(nn.Module):
    """RandSAC decoder layer (pre-norm): self-attention among the target queries (inclusive),
    cross-attention into the (normalised) encoder memory (strict), MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, backend: str = "auto"):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, backend)
        self.norm2 = LayerNorm(dim)
        self.norm_mem = LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads, backend)
        self.norm3 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, mem: Tensor, self_bounds: SegmentBounds, mem_bounds: SegmentBounds) -> Tensor:
        x = x + self.self_attn(self.norm1(x), self_bounds)
        x = x + self.cross_attn.cross(self.norm2(x), self.norm_mem(mem), mem_bounds)
        return x + self.mlp(self.norm3(x))


def init_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform linears (patch embedding as a linear), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            w = m.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(m.proj.bias)


def set_backend(module: nn.Module, backend: str) -> None:
    """Switch the attention backend of every Attention layer (e.g. for parity tests)."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.backend = backend


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x: [B, N, D] (or [1, N, D]), index: [B, M] -> [B, M, D]."""
    x = x.expand(index.shape[0], -1, -1)
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def _whole(cfg, name: str, minimum: int = 1) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def heads_fix(dim: int, heads: int, what: str = "num_heads") -> str:
    """'use num_heads 2 or 4 (divisors of 192 near 3), or an embed_dim divisible by 5'."""
    near = sorted((d for d in range(1, dim + 1) if dim % d == 0), key=lambda d: (abs(d - heads), d))[:2]
    return (f"use {what} {' or '.join(map(str, sorted(near)))} (divisors of {dim} near {heads}), or an embed_dim "
            f"that is a multiple of {heads}")


def check_common_config(cfg) -> None:
    """In place: img_size -> (H, W); validate the fields both model configs share, by name."""
    from ..ops import BACKENDS
    if isinstance(cfg.img_size, bool) or not isinstance(cfg.img_size, (int, tuple, list)):
        raise ValueError(f"img_size must be an integer >= 1 or a pair (H, W); got {cfg.img_size!r}")
    given = cfg.img_size
    cfg.img_size = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else tuple(cfg.img_size)
    if len(cfg.img_size) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in cfg.img_size):
        raise ValueError(f"img_size must be an integer >= 1 or a pair (H, W) of them; got {given!r}")
    for name in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
        _whole(cfg, name)
    _whole(cfg, "blur_kernel", 0)
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}; "
                         + heads_fix(cfg.embed_dim, cfg.num_heads))
    if isinstance(cfg.mlp_ratio, bool) or not isinstance(cfg.mlp_ratio, (int, float)) or not cfg.mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be a number > 0; got {cfg.mlp_ratio!r}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {cfg.backend!r}")
    if cfg.loss not in ("mse", "l1"):
        raise ValueError(f"loss must be 'mse' or 'l1'; got {cfg.loss!r}")


class ViTEncoder(nn.Module):
    """What RandSAC and SAIM share: patch embedding, fixed position embeddings, encoder blocks, norm.

    ``config`` needs img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, backend.
    """

    num_prefix_tokens = 0

    def __init__(self, config, cls_token: bool, persistent_pos: bool):
        super().__init__()
        self.config = c = config
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim)
        self.grid = self.patch_embed.grid
        self.img_size, self.patch_size, self.in_chans = c.img_size, c.patch_size, c.in_chans
        self.num_tokens = self.patch_embed.num_patches
        pos = torch.from_numpy(sincos_2d(c.embed_dim, *self.grid, cls_token=cls_token)).float()[None]
        self.register_buffer("pos_embed", pos, persistent=persistent_pos)
        self.blocks = nn.ModuleList(Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.backend) for _ in range(c.depth))
        self.norm = LayerNorm(c.embed_dim)

    @property
    def backend(self) -> str:
        return self.config.backend

    def aux_backend(self) -> str:
        """Backend for the targets / skip-memory ops: fused Triton where attention is fast."""
        return "reference" if self.backend in ("reference", "sdpa", "sdpa_causal", "flex", "xformers") else "auto"

    def full_bounds(self, x: Tensor) -> SegmentBounds:
        """Bounds of unmasked attention over x [B, N, D] (evaluation: every token sees every token)."""
        seg = torch.zeros(x.shape[:2], dtype=torch.int32, device=x.device)
        return segment_bounds(seg, seg, inclusive=True)

    def check_order(self, order, images: Tensor | None = None) -> None:
        """The model's inputs, by name: ``images`` a float [B, C, H, W] tensor, ``order`` a
        SegmentOrder of this grid and of the same batch."""
        from ..orders import SegmentOrder
        if not isinstance(order, SegmentOrder):
            raise TypeError(f"order must be a randsac_fast.orders.SegmentOrder; got {type(order).__name__} "
                            f"{order!r:.40} — draw one with orders.sample(spec, batch, grid={self.grid})")
        if images is not None:
            if not isinstance(images, Tensor):
                raise TypeError(f"images must be a torch.Tensor [B, C, H, W]; got {type(images).__name__}")
            if not images.is_floating_point():
                raise TypeError(f"images must be a floating-point tensor (normalised pixels); got {images.dtype} — "
                                "convert with images.float() / 255 and normalise by the data's mean / std")
            if images.device.type == "meta":
                raise ValueError("images are on the meta device (no data); pass a tensor with values")
            if images.dim() >= 1 and order.batch != images.shape[0]:
                raise ValueError(f"order is for a batch of {order.batch} but images hold {images.shape[0]}; draw "
                                 f"the order with batch={images.shape[0]}")
        if order.num_tokens != self.num_tokens:
            raise ValueError(f"order has {order.num_tokens} tokens but the model's grid {self.grid} has "
                             f"{self.num_tokens}; sample the order with grid={self.grid}")


SIZES = {  # name: (embed_dim, depth, num_heads)
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
