"""SAIM: stochastic autoregressive image modeling (Qi et al.), in permuted order.

Two streams over one random order (every token its own segment for SAIM's ``random`` order; any
segment order works):

* **content stream** (encoder, ``blocks``): [cls] + the tokens in serial order. A token sees the
  cls token, the earlier tokens and itself ("content mask"); cls sees only itself. As segment ids:
  cls has seg 0, token segments are shifted by +1, and the mask is *inclusive*.
* **query stream** (decoder, ``query_blocks``): one query per token, starting from the token's fixed
  position embedding. After every ``depth // query_depth`` encoder blocks, a query block lets the
  queries attend to the current content states of cls and the *strictly* earlier tokens ("query
  mask"). Both streams go through the block's ``norm1`` as in SAIM's official code.
* **head**: final norm + MLP (or linear) head -> pixels; loss L2 (or L1) against the
  Gaussian-blurred, patch-normalised image.

The official model also runs a query for the cls position and drops its prediction; since no other
query reads the query stream, we do not compute it. The state-dict layout follows the official
release (``blocks.*``, ``query_blocks.*``, ``norm``, ``prediction_head.fc1/fc2``, ``cls_token``,
``pos_embed`` with a cls row, ``patch_embed.proj``) except that q/k/v are one fused ``attn.qkv``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..orders import SegmentOrder
from .hub import PretrainedMixin
from .vit import Block, Mlp, ViTEncoder, check_common_config, gather_rows, init_weights


@dataclass
class SAIMConfig:
    img_size: int | tuple[int, int] = 224    # input side (or (H, W)); multiple of patch_size
    patch_size: int = 16                     # P
    in_chans: int = 3                        # image channels
    embed_dim: int = 768                     # width of both streams
    depth: int = 12                          # content-stream (encoder) blocks
    num_heads: int = 12                      # heads
    query_depth: int = 12                    # query-stream blocks; one after every depth // query_depth
    share_weight: bool = False               # query stream reuses the encoder blocks' weights
    head: str = "mlp"                        # prediction head: "mlp" (paper's best) or "linear"
    mlp_ratio: float = 4.0                   # MLP hidden = mlp_ratio * embed_dim
    norm_pix: bool = True                    # per-patch normalised targets
    blur_kernel: int = 9                     # Gaussian blur of the target (paper's best: 9, sigma 1)
    blur_sigma: float = 1.0                  # its standard deviation
    loss: str = "mse"                        # "mse" (L2) or "l1"
    backend: str = "auto"                    # attention backend (see randsac_fast.ops)

    def __post_init__(self):
        check_common_config(self)
        if self.head not in ("mlp", "linear"):
            raise ValueError(f"head must be 'mlp' or 'linear'; got {self.head!r}")
        if not 1 <= self.query_depth <= self.depth or self.depth % self.query_depth:
            raise ValueError(f"query_depth must divide depth ({self.depth}); got {self.query_depth}")


class SAIM(ViTEncoder, PretrainedMixin):
    num_prefix_tokens = 1

    def __init__(self, config: SAIMConfig | None = None, **overrides):
        cfg = config or SAIMConfig(**overrides)
        super().__init__(cfg, cls_token=True, persistent_pos=True)
        d = cfg.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        if cfg.share_weight:
            self.query_blocks = self.blocks
        else:
            self.query_blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.backend)
                                              for _ in range(cfg.query_depth))
        self.step = cfg.depth // cfg.query_depth
        out = cfg.patch_size ** 2 * cfg.in_chans
        self.prediction_head = Mlp(d, int(d * cfg.mlp_ratio), out) if cfg.head == "mlp" else nn.Linear(d, out)
        init_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)

    def content_input(self, images: Tensor, perm: Tensor) -> Tensor:
        """[cls] + patch tokens in serial order, with position embeddings: [B, 1 + N, D]."""
        tokens = self.patch_embed(images)                  # in the compute dtype; images stay fp32
        pos = self.pos_embed.to(tokens.dtype)
        x = gather_rows(tokens + pos[:, 1:], perm)
        cls = (self.cls_token.to(x.dtype) + pos[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_saim(self, images: Tensor, order: SegmentOrder) -> Tensor:
        """-> predictions [B, N, P*P*C] for the tokens in serial order."""
        self.check_order(order, images)
        order = order.to(images.device)
        content, query = self.bounds(order)
        h = self.content_input(images, order.perm)
        g = gather_rows(self.pos_embed[:, 1:].to(h.dtype), order.perm)
        for i, blk in enumerate(self.blocks):
            h = blk(h, content)
            if (i + 1) % self.step == 0:
                g = self.query_blocks[i // self.step].cross(g, h, query)
        return self.prediction_head(self.norm(g))

    @staticmethod
    def bounds(order: SegmentOrder) -> tuple[ops.SegmentBounds, ops.SegmentBounds]:
        """(content stream, query stream) bounds, once per forward. With one token per segment
        (``random`` / ``raster``) both are plain causal: the content stream [cls, t_1..t_N] is
        causal, and query t_i sees cls, t_1..t_{i-1} — causal (top-left) on the keys shifted by
        the cls — so the model declares it and a backend may use a causal kernel with no mask."""
        seg_q = order.seg + 1                                            # token segments after cls
        seg_c = torch.cat([torch.zeros_like(seg_q[:, :1]), seg_q], 1)   # content stream: cls = 0
        causal = order.segment_size == 1
        return ops.segment_bounds(seg_c, seg_c, True, causal), ops.segment_bounds(seg_q, seg_c, False, causal)

    def forward(self, images: Tensor, order: SegmentOrder) -> Tensor:
        """Scalar training loss."""
        order = order.to(images.device)              # non-blocking, and a no-op when already there
        pred = self.forward_saim(images, order)
        c = self.config
        return ops.patch_loss(pred, images, c.patch_size, order.perm, None,
                              blur_kernel=c.blur_kernel, blur_sigma=c.blur_sigma, norm_pix=c.norm_pix,
                              loss=c.loss, backend=self.aux_backend())

    @torch.no_grad()
    def predict(self, images: Tensor, order: SegmentOrder) -> tuple[Tensor, Tensor]:
        """(pred [B, N, P*P*C], valid [B, N] bool) in raster order; SAIM predicts every token."""
        order = order.to(images.device)
        pred = self.forward_saim(images, order)
        perm = order.perm
        out = torch.empty_like(pred).scatter_(1, perm[..., None].expand_as(pred), pred)
        return out, torch.ones(perm.shape, dtype=torch.bool, device=perm.device)

    def train_flops(self, order: SegmentOrder) -> float:
        """FLOPs of one training step (3x forward), matmuls only, visible attention pairs only."""
        c, d = self.config, self.config.embed_dim
        b, n = order.perm.shape
        k = c.patch_size ** 2 * c.in_chans
        mlp = 2 * int(d * c.mlp_ratio) * d
        content, query = self.bounds(order)
        fwd = 2 * b * n * k * d
        fwd += c.depth * (2 * b * (n + 1) * (4 * d * d + mlp) + 4 * d * float(content.visible_pairs().sum()))
        fwd += c.query_depth * (2 * b * (n * (2 * d * d + mlp) + (n + 1) * 2 * d * d)
                                + 4 * d * float(query.visible_pairs().sum()))
        head = 2 * d * int(d * c.mlp_ratio) + 2 * int(d * c.mlp_ratio) * k if c.head == "mlp" else 2 * d * k
        fwd += b * n * head
        return 3.0 * fwd

    def forward_features(self, images: Tensor) -> Tensor:
        """Unmasked encoder (evaluation): [B, 1 + N, D] after the final norm, cls first."""
        perm = torch.arange(self.num_tokens, device=images.device).expand(images.shape[0], -1)
        x = self.content_input(images, perm)
        bounds = self.full_bounds(x)
        for blk in self.blocks:
            x = blk(x, bounds)
        return self.norm(x)
