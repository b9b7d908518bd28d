"""AIM: autoregressive image models with prefix-causal attention (El-Nouby et al., ICML 2024), in
permuted order on the segment-attention ops.

One ViT trunk, no decoder, no cls token. An order from ``orders.sample("prefix...")`` puts the first
P tokens in segment 0 and every later token in a segment of its own (``seg = [0]*P + [1..N-P]``);
with *inclusive* visibility that is exactly AIM's prefix-causal mask: the prefix attends
bidirectionally within itself, every later token causally. The staircase kernels serve it as they
serve RandSAC and SAIM — no mask, no block mask.

* **trunk** (``blocks``): the patch tokens in serial order with their position embeddings.
* **head**: the trunk's output at serial position t predicts the patch at position t + 1. AIM adds
  position embeddings again before its MLP head; here the head gets the position embedding of the
  patch it predicts, which in raster order is the next position (implied) and with
  ``prefix:random`` tells the head *which* patch comes next. Then ``head_depth`` residual MLP blocks
  (each patch on its own), a norm and a linear map to pixels.
* **loss**: MSE (or L1) against per-patch normalised pixels of the non-prefix patches only: the
  prefix patches are context, never targets.

``forward_features`` runs the trunk with full bidirectional attention in raster order (downstream
use, as AIM does). Deviation from the paper: the trunk's linear layers keep their biases (the shared
ViT block of this package); AIM drops them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..orders import SegmentOrder
from .hub import PretrainedMixin
from .vit import LayerNorm, Mlp, ViTEncoder, check_common_config, gather_rows, init_weights


@dataclass
class AIMConfig:
    img_size: int | tuple[int, int] = 224    # input side (or (H, W)); multiple of patch_size
    patch_size: int = 14                     # P (AIM: 14 at 224 px)
    in_chans: int = 3                        # image channels
    embed_dim: int = 768                     # trunk width
    depth: int = 12                          # trunk blocks
    num_heads: int = 12                      # heads
    mlp_ratio: float = 4.0                   # MLP hidden = mlp_ratio * width, trunk and head (AIM: 4)
    head_depth: int = 12                     # residual MLP blocks of the prediction head (AIM: N=12)
    norm_pix: bool = True                    # per-patch normalised targets (AIM: yes)
    blur_kernel: int = 0                     # Gaussian blur of the target (AIM: none)
    blur_sigma: float = 1.0                  # its standard deviation
    loss: str = "mse"                        # "mse" (AIM's L2) or "l1"
    backend: str = "auto"                    # attention backend (see randsac_fast.ops)

    def __post_init__(self):
        check_common_config(self)
        if isinstance(self.head_depth, bool) or not isinstance(self.head_depth, int) or self.head_depth < 0:
            raise ValueError(f"head_depth must be an int >= 0 (MLP blocks of the head); got {self.head_depth!r}")


class HeadBlock(nn.Module):
    """Pre-norm residual MLP on each token alone (AIM's prediction-head block)."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


class AIM(ViTEncoder, PretrainedMixin):
    num_prefix_tokens = 0

    def __init__(self, config: AIMConfig | None = None, **overrides):
        cfg = config or AIMConfig(**overrides)
        super().__init__(cfg, cls_token=False, persistent_pos=False)
        d = cfg.embed_dim
        self.head_blocks = nn.ModuleList(HeadBlock(d, cfg.mlp_ratio) for _ in range(cfg.head_depth))
        self.head_norm = LayerNorm(d)
        self.head = nn.Linear(d, cfg.patch_size ** 2 * cfg.in_chans)
        init_weights(self)

    # ---- the method: trunk over the order, head on each position, loss on non-prefix targets ----
    def forward_trunk(self, images: Tensor, order: SegmentOrder) -> Tensor:
        """Prefix-causal trunk: [B, N, D] states in serial order, after the final norm."""
        self.check_order(order)
        bounds = ops.segment_bounds(order.seg, order.seg, inclusive=True)
        x = gather_rows(self.patch_embed(images) + self.pos_embed.to(images.dtype), order.perm)
        for blk in self.blocks:
            x = blk(x, bounds)
        return self.norm(x)

    def forward_head(self, h: Tensor, target_perm: Tensor) -> Tensor:
        """h: [B, M, D] trunk states; target_perm: [B, M] raster index of the patch each row predicts
        -> pixels [B, M, P*P*C]."""
        x = h + gather_rows(self.pos_embed.to(h.dtype), target_perm)
        for blk in self.head_blocks:
            x = blk(x)
        return self.head(self.head_norm(x))

    def forward_aim(self, images: Tensor, order: SegmentOrder) -> Tensor:
        """-> predictions [B, N-1, P*P*C]: row t is the prediction of the patch at serial position t+1."""
        order = order.to(images.device)
        h = self.forward_trunk(images, order)
        return self.forward_head(h[:, :-1], order.perm[:, 1:])

    @staticmethod
    def targets_valid(order: SegmentOrder) -> Tensor:
        """[B, N-1] bool: serial positions 1..N-1 that are targets (not in the prefix, segment 0)."""
        return order.seg[:, 1:] >= 1

    def forward(self, images: Tensor, order: SegmentOrder) -> Tensor:
        """Scalar training loss: mean over the non-prefix patches of the next-patch error."""
        order = order.to(images.device)             # non-blocking, and a no-op when already there
        pred = self.forward_aim(images, order)
        c = self.config
        return ops.patch_loss(pred, images, c.patch_size, order.perm[:, 1:].contiguous(), self.targets_valid(order),
                              blur_kernel=c.blur_kernel, blur_sigma=c.blur_sigma, norm_pix=c.norm_pix,
                              loss=c.loss, backend=self.aux_backend())

    @torch.no_grad()
    def predict(self, images: Tensor, order: SegmentOrder) -> tuple[Tensor, Tensor]:
        """(pred [B, N, P*P*C], valid [B, N] bool) in raster order; prefix patches are not predicted."""
        order = order.to(images.device)
        pred = self.forward_aim(images, order)
        b, n = order.perm.shape
        out = pred.new_zeros(b, n, pred.shape[-1])
        target = order.perm[:, 1:]
        out.scatter_(1, target[..., None].expand_as(pred), pred)
        valid = torch.zeros(b, n, dtype=torch.bool, device=pred.device)
        valid.scatter_(1, target, self.targets_valid(order))
        return out, valid

    def train_flops(self, order: SegmentOrder) -> float:
        """FLOPs of one training step (3x forward), matmuls only, visible attention pairs only."""
        c, d = self.config, self.config.embed_dim
        b, n = order.perm.shape
        k = c.patch_size ** 2 * c.in_chans
        mlp = 2 * int(d * c.mlp_ratio) * d
        bounds = ops.segment_bounds(order.seg, order.seg, inclusive=True)
        fwd = 2 * b * n * k * d                                                   # patch embedding
        fwd += c.depth * (2 * b * n * (4 * d * d + mlp) + 4 * d * float(bounds.visible_pairs().sum()))
        fwd += 2 * b * (n - 1) * (c.head_depth * mlp + d * k)                    # head on N-1 rows
        return 3.0 * fwd

    def forward_features(self, images: Tensor) -> Tensor:
        """Bidirectional trunk (evaluation): [B, N, D] in raster order after the final norm."""
        x = self.patch_embed(images) + self.pos_embed.to(images.dtype)
        bounds = self.full_bounds(x)
        for blk in self.blocks:
            x = blk(x, bounds)
        return self.norm(x)
