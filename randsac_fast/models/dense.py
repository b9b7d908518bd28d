"""Whole-model dense references, in raster order with explicit (B, N, N) masks.

These re-compute RandSAC, SAIM and AIM from a model's parameters the way the papers (and their
released code) describe them: tokens stay in raster order, every attention gets a boolean mask
built from each token's segment rank, attention is plain ``softmax(QK^T)V``. Nothing here uses
the permuted-order machinery or :mod:`randsac_fast.ops`, so the fast models can be checked
against it: same weights + same order -> same loss and gradients. Run it in float64 for tests
(``model.double()``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..orders import SegmentOrder
from .aim import AIM
from .randsac import RandSAC
from .saim import SAIM
from .vit import Attention, Block, DecoderBlock


def attend(attn: Attention, xq: Tensor, xkv: Tensor, mask: Tensor) -> Tensor:
    """Multi-head attention with an explicit mask [B, Nq, Nk]; rows that see nothing give 0."""
    b, nq, d = xq.shape
    h, dh = attn.num_heads, attn.head_dim
    w, bias = attn.qkv.weight, attn.qkv.bias
    q = (xq @ w[:d].T + bias[:d]).view(b, nq, h, dh).transpose(1, 2)
    k = (xkv @ w[d:2 * d].T + bias[d:2 * d]).view(b, -1, h, dh).transpose(1, 2)
    v = (xkv @ w[2 * d:].T + bias[2 * d:]).view(b, -1, h, dh).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * dh ** -0.5
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)     # all -inf row -> NaN -> 0
    out = (probs @ v).transpose(1, 2).reshape(b, nq, d)
    return attn.proj(out)


def encoder_block(blk: Block, x: Tensor, mask: Tensor) -> Tensor:
    x = x + attend(blk.attn, blk.norm1(x), blk.norm1(x), mask)
    return x + blk.mlp(blk.norm2(x))


def query_block(blk: Block, g: Tensor, h: Tensor, mask: Tensor) -> Tensor:
    """SAIM's query-stream block: queries g, keys/values the content states h, one norm1."""
    g = g + attend(blk.attn, blk.norm1(g), blk.norm1(h), mask)
    return g + blk.mlp(blk.norm2(g))


def decoder_block(blk: DecoderBlock, x: Tensor, mem: Tensor, self_mask: Tensor, mem_mask: Tensor) -> Tensor:
    x = x + attend(blk.self_attn, blk.norm1(x), blk.norm1(x), self_mask)
    x = x + attend(blk.cross_attn, blk.norm2(x), blk.norm_mem(mem), mem_mask)
    return x + blk.mlp(blk.norm3(x))


def masked_mean(err: Tensor, valid: Tensor) -> Tensor:
    """Mean over valid tokens of the per-token mean error."""
    return (err.mean(-1) * valid).sum() / valid.sum()


# --------------------------------------------------------------------------------------------
# RandSAC (Fig. 4): source mask, target mask, memory mask, all from segment ranks
# --------------------------------------------------------------------------------------------
def randsac_forward_dense(model: RandSAC, images: Tensor, order: SegmentOrder) -> tuple[Tensor, Tensor]:
    """-> (pred [B, N, P*P*C], valid [B, N]) in raster order; valid = tokens not in segment 0."""
    rank = order.ranks().to(images.device)                     # [B, N] segment rank of each raster token
    src_mask = reference.visibility(rank, rank, inclusive=True)          # own + earlier segments
    mem_mask = reference.visibility(rank, rank, inclusive=False)         # strictly earlier segments
    has_query = rank >= 1                                      # segment 0 is never predicted
    tgt_mask = src_mask & has_query[:, None, :]                # decoder self-attn: predicted tokens only

    x = model.patch_embed(images) + model.pos_embed
    hidden = []
    for blk in model.blocks:
        x = encoder_block(blk, x, src_mask)
        hidden.append(x)
    hidden[-1] = model.norm(x)
    if model.skip_weight is None:
        memory = [hidden[-1]] * len(model.decoder_blocks)
    else:
        memory = list(reference.skip_memory(torch.stack(hidden), model.skip_weight))

    y = model.pos_embed.expand(images.shape[0], -1, -1)
    for blk, mem in zip(model.decoder_blocks, memory):
        y = decoder_block(blk, y, mem, tgt_mask, mem_mask)
    return model.head(model.decoder_norm(y)), has_query


def randsac_loss_dense(model: RandSAC, images: Tensor, order: SegmentOrder) -> Tensor:
    c = model.config
    pred, valid = randsac_forward_dense(model, images, order)
    target = reference.patch_targets(images, c.patch_size, blur_kernel=c.blur_kernel,
                                     blur_sigma=c.blur_sigma, norm_pix=c.norm_pix)
    err = (pred - target) ** 2 if c.loss == "mse" else (pred - target).abs()
    return masked_mean(err, valid)


# --------------------------------------------------------------------------------------------
# SAIM (official semantics): content mask h, query mask g, cls token first
# --------------------------------------------------------------------------------------------
def saim_masks(order: SegmentOrder, device) -> tuple[Tensor, Tensor]:
    """Content and query masks [B, 1+N, 1+N] in raster order with cls at index 0."""
    rank = order.ranks().to(device)
    b, n = rank.shape
    content = torch.zeros(b, n + 1, n + 1, dtype=torch.bool, device=device)
    query = torch.zeros_like(content)
    content[:, 1:, 1:] = reference.visibility(rank, rank, inclusive=True)
    query[:, 1:, 1:] = reference.visibility(rank, rank, inclusive=False)
    content[:, :, 0] = True          # every position sees cls ...
    query[:, :, 0] = True
    return content, query            # ... and cls (row 0) sees only itself


def saim_forward_dense(model: SAIM, images: Tensor, order: SegmentOrder) -> Tensor:
    """-> predictions [B, N, P*P*C] for every token, raster order."""
    mask_h, mask_g = saim_masks(order, images.device)
    x = model.patch_embed(images) + model.pos_embed[:, 1:]
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    h = torch.cat([cls, x], dim=1)
    g = model.pos_embed.expand(x.shape[0], -1, -1)
    for i, blk in enumerate(model.blocks):
        h = encoder_block(blk, h, mask_h)
        if (i + 1) % model.step == 0:
            g = query_block(model.query_blocks[i // model.step], g, h, mask_g)
    return model.prediction_head(model.norm(g))[:, 1:]


def saim_loss_dense(model: SAIM, images: Tensor, order: SegmentOrder) -> Tensor:
    c = model.config
    pred = saim_forward_dense(model, images, order)
    target = reference.patch_targets(images, c.patch_size, blur_kernel=c.blur_kernel,
                                     blur_sigma=c.blur_sigma, norm_pix=c.norm_pix)
    err = (pred - target) ** 2 if c.loss == "mse" else (pred - target).abs()
    return err.mean()


# --------------------------------------------------------------------------------------------
# AIM (El-Nouby et al.): prefix-causal mask, next-patch prediction, loss on non-prefix patches
# --------------------------------------------------------------------------------------------
def aim_forward_dense(model: AIM, images: Tensor, order: SegmentOrder) -> tuple[Tensor, Tensor]:
    """-> (pred [B, N, P*P*C], valid [B, N]) in raster order: the prediction *of* each patch, made by
    the trunk's output at the patch just before it in the order; valid = patches outside the prefix."""
    rank = order.ranks().to(images.device)                 # 0 for the prefix, 1, 2, ... after it
    mask = reference.visibility(rank, rank, inclusive=True)           # prefix bidirectional, then causal
    x = model.patch_embed(images) + model.pos_embed
    for blk in model.blocks:
        x = encoder_block(blk, x, mask)
    x = model.norm(x)
    perm = order.perm.to(images.device)
    position = perm.argsort(dim=1)                         # serial position of each raster patch
    previous = perm.gather(1, (position - 1).clamp(min=0))  # raster patch just before it in the order
    y = x.gather(1, previous[..., None].expand(-1, -1, x.shape[-1])) + model.pos_embed
    for blk in model.head_blocks:
        y = y + blk.mlp(blk.norm(y))
    return model.head(model.head_norm(y)), rank >= 1


def aim_loss_dense(model: AIM, images: Tensor, order: SegmentOrder) -> Tensor:
    c = model.config
    pred, valid = aim_forward_dense(model, images, order)
    target = reference.patch_targets(images, c.patch_size, blur_kernel=c.blur_kernel,
                                     blur_sigma=c.blur_sigma, norm_pix=c.norm_pix)
    err = (pred - target) ** 2 if c.loss == "mse" else (pred - target).abs()
    return masked_mean(err, valid)


def loss_dense(model, images: Tensor, order: SegmentOrder) -> Tensor:
    """Dense reference loss of any model."""
    if isinstance(model, RandSAC):
        return randsac_loss_dense(model, images, order)
    if isinstance(model, SAIM):
        return saim_loss_dense(model, images, order)
    if isinstance(model, AIM):
        return aim_loss_dense(model, images, order)
    raise TypeError(f"no dense reference for {type(model).__name__}")
