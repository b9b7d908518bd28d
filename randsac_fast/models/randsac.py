"""RandSAC: random segments with autoregressive coding (Hua et al.), in permuted order.

Read against the paper's Figure 4 / Section 4:

* **order**: a :class:`~randsac_fast.SegmentOrder` (segments of tokens, serialised at random).
* **encoder** (masked, "source mask"): tokens of segments 0..S-2 in serial order with their fixed
  position embeddings; a token sees its own segment and all earlier ones (inclusive).
* **decoder**: one query per token of segments 1..S-1 (the target sequence shifted by one
  segment), initialised with the token's fixed position embedding. Self-attention among the
  queries is masked like the encoder (inclusive); cross-attention into the encoder memory sees only
  strictly earlier segments ("memory mask"). With *trainable skip connections* (Section 4.2 /
  A.3), decoder layer l reads Z_l = sum_k W[l, k] H_k over the encoder layer outputs.
* **loss**: MSE (or L1) against patch-normalised pixels of the predicted tokens.

Everything runs in the serialised ("permuted") order: tokens are gathered once at the input and the
targets are gathered by the same indices; nothing is un-permuted on the training path. Fixed-size
segments (squares) drop the last / first segment by slicing; variable-size ones (blobs) by right
padding with a sentinel segment id (:data:`SENTINEL`) that no real query can see, to a length that
depends only on the grid (N - 1), so every batch has the same shapes. The split never reads the
device: segment sizes come from the host (:attr:`SegmentOrder.segment_size`). The attention bounds
of the three patterns (encoder, decoder self, decoder -> memory) are built once per forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import ops
from ..orders import SENTINEL, SegmentOrder
from ..ops import SegmentBounds, segment_bounds
from .hub import PretrainedMixin
from .vit import DecoderBlock, LayerNorm, ViTEncoder, check_common_config, gather_rows, heads_fix, init_weights


@dataclass
class RandSACConfig:
    img_size: int | tuple[int, int] = 32     # input side (or (H, W)); multiple of patch_size
    patch_size: int = 4                      # P: tokens are P x P pixel patches
    in_chans: int = 3                        # image channels
    embed_dim: int = 192                     # encoder and decoder width
    depth: int = 12                          # encoder layers (Lenc)
    num_heads: int = 3                       # encoder heads
    decoder_depth: int = 3                   # decoder layers (Ldec)
    decoder_num_heads: int | None = None     # decoder heads (None: same as the encoder)
    mlp_ratio: float = 4.0                   # MLP hidden = mlp_ratio * embed_dim
    skip_memory: bool = False                # trainable skip connections Z_l = sum_k W[l,k] H_k
    norm_pix: bool = True                    # per-patch normalised pixel targets (MAE)
    blur_kernel: int = 0                     # Gaussian blur of the target (0: none; SAIM uses 9)
    blur_sigma: float = 1.0                  # its standard deviation
    loss: str = "mse"                        # "mse" or "l1"
    backend: str = "auto"                    # attention backend (see randsac_fast.ops)

    def __post_init__(self):
        check_common_config(self)
        if isinstance(self.decoder_depth, bool) or not isinstance(self.decoder_depth, int) or self.decoder_depth < 1:
            raise ValueError(f"decoder_depth must be an integer >= 1; got {self.decoder_depth!r}")
        heads = self.decoder_num_heads
        if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
            raise ValueError(f"decoder_num_heads must be an integer >= 1 or None (the encoder's); got {heads!r}")
        if heads is not None and self.embed_dim % heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by decoder_num_heads {heads}; "
                             + heads_fix(self.embed_dim, heads, "decoder_num_heads"))


@dataclass
class EncDecSplit:
    """Which serial positions feed the encoder and which become decoder queries.

    enc_perm/enc_seg: [B, Le]; dec_perm/dec_seg: [B, Ld]; dec_valid: [B, Ld] bool or None (all).
    """
    enc_perm: Tensor
    enc_seg: Tensor
    dec_perm: Tensor
    dec_seg: Tensor
    dec_valid: Tensor | None = field(default=None)

    def bounds(self, causal: bool = False) -> tuple[SegmentBounds, SegmentBounds, SegmentBounds]:
        """(encoder self, decoder self, decoder -> memory) bounds: built once, shared by every layer.
        causal: one token per segment (every kv_len[i] = i + 1; no search needed)."""
        return (segment_bounds(self.enc_seg, self.enc_seg, True, causal),
                segment_bounds(self.dec_seg, self.dec_seg, True, causal),
                segment_bounds(self.dec_seg, self.enc_seg, False, causal))


def split_order(order: SegmentOrder, pad: bool | None = None) -> EncDecSplit:
    """Encoder = segments 0..S-2, decoder = segments 1..S-1 of every sample. Reads nothing back
    from the device.

    When the host knows that every segment has m tokens (``order.segment_size``, set by the
    samplers for squares / random / raster) this is two slices (Le = Ld = N - m). Otherwise (blobs,
    or ``pad=True``) the encoder and the decoder are both right-padded with SENTINEL ids to the
    static length N - 1 (the longest either can be), so shapes never change between batches.
    """
    perm, seg = order.perm, order.seg
    b, n = seg.shape
    m = order.segment_size
    if ops.checks_enabled(None) and bool((seg[:, -1] == 0).any()):     # one sync, first step only
        raise ValueError("an image of this order is one segment: nothing to predict — RandSAC needs "
                         "at least 2 segments (e.g. square:K with K > 1, blob:K with K > 1)")
    if m is not None and m >= n:
        raise ValueError(f"every image of this order is one segment of {m} tokens: nothing to predict — "
                         "RandSAC needs at least 2 segments (e.g. square:K with K > 1, blob:K with K > 1)")
    if pad is False and m is None:
        raise ValueError("pad=False needs equal segment sizes known on the host (order.segment_size); "
                         "sample the order with randsac_fast.orders.sample or leave pad=None")
    if m is not None and not pad:
        return EncDecSplit(perm[:, :n - m], seg[:, :n - m], perm[:, m:], seg[:, m:])
    first = (seg == 0).sum(1, dtype=torch.int64)                       # [B] tokens in the first segment
    last = (seg == seg[:, -1:]).sum(1, dtype=torch.int64)              # [B] tokens in the last segment
    length = n - 1
    sentinel = torch.full((), SENTINEL, dtype=seg.dtype, device=seg.device)
    t = torch.arange(length, device=seg.device)[None]
    # encoder: positions t < N - last_b are real
    enc_seg = torch.where(t < (n - last)[:, None], seg[:, :length], sentinel)
    # decoder: query t takes serial position first_b + t
    src = first[:, None] + t
    dec_valid = src < n
    src = src.clamp(max=n - 1)
    dec_seg = torch.where(dec_valid, torch.gather(seg, 1, src), sentinel)
    return EncDecSplit(perm[:, :length], enc_seg, torch.gather(perm, 1, src), dec_seg, dec_valid)


class RandSAC(ViTEncoder, PretrainedMixin):
    num_prefix_tokens = 0

    def __init__(self, config: RandSACConfig | None = None, **overrides):
        cfg = config or RandSACConfig(**overrides)
        super().__init__(cfg, cls_token=False, persistent_pos=False)
        d = cfg.embed_dim
        dec_heads = cfg.decoder_num_heads or cfg.num_heads
        self.decoder_blocks = nn.ModuleList(DecoderBlock(d, dec_heads, cfg.mlp_ratio, cfg.backend)
                                            for _ in range(cfg.decoder_depth))
        self.decoder_norm = LayerNorm(d)
        self.head = nn.Linear(d, cfg.patch_size ** 2 * cfg.in_chans)
        init_weights(self)
        if cfg.skip_memory:
            # W[l, k]: decoder layer l reads sum_k W[l,k] H_k. Initialised to read only the final
            # (normalised) encoder output, so training starts from the plain masked transformer.
            w = torch.zeros(cfg.decoder_depth, cfg.depth)
            w[:, -1] = 1.0
            self.skip_weight = nn.Parameter(w)
        else:
            self.skip_weight = None

    # ---- encoder -----------------------------------------------------------------------------
    def embed(self, images: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, N, D] raster tokens with position embeddings."""
        x = self.patch_embed(images)
        return x + self.pos_embed.to(x.dtype)

    def forward_encoder(self, images: Tensor, split: EncDecSplit, bounds: SegmentBounds) -> list[Tensor]:
        """Masked encoder over the serialised tokens. Returns the memory of each decoder layer,
        each [B, Le, D]: H_1..H_{L-1}, norm(H_L) combined by the skip weights (or norm(H_L))."""
        x = gather_rows(self.embed(images), split.enc_perm)
        hidden = []
        for blk in self.blocks:
            x = blk(x, bounds)
            hidden.append(x)
        hidden[-1] = self.norm(x)
        if self.skip_weight is None:
            return [hidden[-1]] * len(self.decoder_blocks)
        mem = ops.skip_memory(hidden, self.skip_weight, backend=self.aux_backend())   # a list: no stack
        return list(mem.unbind(0))

    # ---- decoder -----------------------------------------------------------------------------
    def forward_decoder(self, memory: list[Tensor], split: EncDecSplit, bounds: tuple[SegmentBounds, SegmentBounds],
                        dtype: torch.dtype) -> Tensor:
        """Queries = position embeddings of the target tokens -> predictions [B, Ld, P*P*C]."""
        x = gather_rows(self.pos_embed.to(dtype), split.dec_perm)
        for blk, mem in zip(self.decoder_blocks, memory):
            x = blk(x, mem, *bounds)
        return self.head(self.decoder_norm(x))

    def forward_loss(self, images: Tensor, pred: Tensor, split: EncDecSplit) -> Tensor:
        c = self.config
        return ops.patch_loss(pred, images, c.patch_size, split.dec_perm, split.dec_valid,
                              blur_kernel=c.blur_kernel, blur_sigma=c.blur_sigma, norm_pix=c.norm_pix,
                              loss=c.loss, backend=self.aux_backend())

    def forward_permuted(self, images: Tensor, order: SegmentOrder, pad: bool | None = None):
        """-> (pred [B, Ld, P*P*C] in serial order, split)."""
        self.check_order(order, images)
        split = split_order(order.to(images.device), pad)
        enc, dec, cross = split.bounds(causal=order.segment_size == 1 and not pad)
        memory = self.forward_encoder(images, split, enc)
        return self.forward_decoder(memory, split, (dec, cross), memory[0].dtype), split

    def forward(self, images: Tensor, order: SegmentOrder, pad: bool | None = None) -> Tensor:
        """Scalar training loss."""
        pred, split = self.forward_permuted(images, order, pad)
        return self.forward_loss(images, pred, split)

    @torch.no_grad()
    def predict(self, images: Tensor, order: SegmentOrder) -> tuple[Tensor, Tensor]:
        """(pred [B, N, P*P*C], valid [B, N] bool) in raster token order; valid marks predicted tokens."""
        pred, split = self.forward_permuted(images, order)
        b = images.shape[0]
        valid = split.dec_valid if split.dec_valid is not None else torch.ones_like(split.dec_perm, dtype=torch.bool)
        out = pred.new_zeros(b, self.num_tokens, pred.shape[-1])
        mask = torch.zeros(b, self.num_tokens, dtype=torch.bool, device=pred.device)
        rows = torch.arange(b, device=pred.device)[:, None].expand_as(split.dec_perm)
        out[rows[valid], split.dec_perm[valid]] = pred[valid]
        mask[rows[valid], split.dec_perm[valid]] = True
        return out, mask

    def train_flops(self, order: SegmentOrder) -> float:
        """FLOPs of one training step (forward + backward = 3x forward) on this batch of orders,
        counting matmuls only and, in attention, only the visible (query, key) pairs."""
        c, d = self.config, self.config.embed_dim
        split = split_order(order)
        enc, dec, cross = split.bounds()
        b, le = split.enc_perm.shape
        ld = split.dec_perm.shape[1]
        k = c.patch_size ** 2 * c.in_chans
        mlp = 2 * int(d * c.mlp_ratio) * d
        fwd = 2 * b * self.num_tokens * k * d                                  # patch embedding
        fwd += c.depth * 2 * b * le * (4 * d * d + mlp)                        # encoder linears
        fwd += c.depth * 4 * d * float(enc.visible_pairs().sum())     # padded queries count no pairs
        fwd += c.decoder_depth * 2 * b * (ld * (6 * d * d + mlp) + le * 2 * d * d)   # decoder linears
        fwd += c.decoder_depth * 4 * d * float(dec.visible_pairs().sum() + cross.visible_pairs().sum())
        if self.skip_weight is not None:
            fwd += 2 * c.decoder_depth * c.depth * b * le * d
        fwd += 2 * b * ld * d * k                                              # head
        return 3.0 * fwd

    def forward_features(self, images: Tensor) -> Tensor:
        """Unmasked encoder (evaluation): [B, N, D] after the final norm, raster order."""
        x = self.embed(images)
        bounds = self.full_bounds(x)
        for blk in self.blocks:
            x = blk(x, bounds)
        return self.norm(x)
