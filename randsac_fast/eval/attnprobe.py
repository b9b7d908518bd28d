"""Attentive probe of a frozen encoder: ``torchrun -m randsac_fast.attnprobe --ckpt CKPT --data DATA``.

AIM's evaluation protocol (El-Nouby et al., also V-JEPA's): instead of averaging the patch tokens
into one vector, a small head *learns where to look*. The frozen encoder runs unmasked; its
last-block (normed) patch tokens [B, N, D] are standardised by a BatchNorm without affine
parameters; learned queries cross-attend to them (multi-head; keys and values are linear maps of
the tokens, the queries are free parameters with no projection, and there is no output projection);
the queries' outputs are averaged and a linear layer classifies. Only the head trains.

Everything else — labelled data, resume, checkpoints, ``metrics.jsonl``, the closing summary,
distribution — is the linear probe's (:mod:`randsac_fast.eval.linprobe`). The optimizer is AdamW
(the head has attention weights, not only a linear layer); its learning rate, weight decay and
epochs are this package's defaults, not a published recipe: pass the flags to change them.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import config as config_mod
from .. import interop
from . import linprobe

__all__ = ["AttentivePoolingHead", "patch_tokens", "attentive_probe_accuracy", "build_parser", "ATTENTIVE", "run",
           "main"]


class AttentivePoolingHead(nn.Module):
    """[B, N, D] frozen tokens -> [B, K] logits (AIM's attentive probe, see the module docstring)."""

    def __init__(self, dim: int, num_heads: int, num_classes: int, num_queries: int = 1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"the probe's width {dim} is not divisible by its {num_heads} heads; pass --heads "
                             f"a divisor of {dim}")
        self.num_heads = num_heads
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        b, n, d = tokens.shape
        h = self.num_heads
        x = self.norm(tokens.transpose(1, 2)).transpose(1, 2)            # standardise each feature
        q = self.queries.expand(b, -1, -1).reshape(b, -1, h, d // h).transpose(1, 2)
        k = self.k(x).reshape(b, n, h, d // h).transpose(1, 2)
        v = self.v(x).reshape(b, n, h, d // h).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v)                 # [B, h, queries, D/h], no mask
        return self.linear(pooled.transpose(1, 2).reshape(b, -1, d).mean(dim=1))


def patch_tokens(model: nn.Module, images: Tensor) -> Tensor:
    """images [B, C, H, W] -> [B, N, D] fp32: the encoder's normed last-block patch tokens (a cls
    token, where the model has one, is left out)."""
    return model.forward_features(images)[:, model.num_prefix_tokens:].float()


@torch.no_grad()
def _tokens(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    model.eval()
    return torch.cat([patch_tokens(model, images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)])


def attentive_probe_accuracy(model: nn.Module, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], *,
                             epochs: int = 100, batch_size: int = 256, lr: float = 1e-2, weight_decay: float = 0.5,
                             seed: int = 0) -> float:
    """The in-memory attentive probe (the quick counterpart of :func:`..probe.linear_probe_accuracy`
    for small labelled sets such as digits): the frozen encoder's patch tokens of the un-augmented
    ``train`` images are computed once, the head trains with AdamW (cosine decay, no warm-up) and
    is scored on ``test``. Deterministic for a given ``seed``. lr and weight decay were chosen on a
    validation split carved out of digits' *training* images (lr 1e-3 / 3e-3 / 1e-2 x wd 0.05 / 0.5,
    three pre-trained digits encoders, two probe seeds each); the test split played no part."""
    x_train, x_test = _tokens(model, train[0]), _tokens(model, test[0])
    y_train = train[1].long()
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AttentivePoolingHead(x_train.shape[-1], model.config.num_heads, int(y_train.max()) + 1)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-len(y_train) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(y_train), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(head(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        return float((head(x_test).argmax(1) == test[1].long()).float().mean())


def build_parser() -> argparse.ArgumentParser:
    p = config_mod.Parser(prog="python -m randsac_fast.attnprobe",
                          description="Attentive probe (AIM's evaluation) of a frozen RandSAC / SAIM / AIM encoder "
                                      "(torchrun for several processes).",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    interop.add_checkpoint_args(p)
    p.add_argument("--data", required=True, help="digits, a directory with train/ and val/, or CIFAR pickles")
    p.add_argument("--out", default="runs/attnprobe", help="run directory: metrics.jsonl, checkpoints")
    p.add_argument("--epochs", type=float, default=90, help="training epochs")
    p.add_argument("--warmup-epochs", type=float, default=10, help="linear warmup epochs")
    p.add_argument("--batch-size", type=int, default=256, help="images per rank per step")
    p.add_argument("--blr", type=float, default=1e-3, help="base lr; lr = blr * global batch / 256")
    p.add_argument("--min-lr", type=float, default=0.0, help="final lr of the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay of the head")
    p.add_argument("--heads", type=int, default=None, help="attention heads of the probe (default: the encoder's)")
    p.add_argument("--queries", type=int, default=1, help="learned queries, averaged after attending")
    p.add_argument("--augment", choices=("mae", "none"), default="mae",
                   help="mae: RandomResizedCrop(0.08, 1) + horizontal flip; none: the evaluation view")
    linprobe.add_run_args(p, log_every=50)
    return p


def _head(encoder, num_classes: int, args) -> AttentivePoolingHead:
    for name in ("heads", "queries"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} {value}: must be at least 1")
    heads = args.heads or encoder.config.num_heads
    return AttentivePoolingHead(encoder.config.embed_dim, heads, num_classes, args.queries)


def _optimizer(params, lr: float, args):
    if args.weight_decay < 0:
        raise ValueError(f"--weight-decay {args.weight_decay}: must be >= 0")
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)


ATTENTIVE = linprobe.Probe("attnprobe", build_parser, features=lambda encoder, images, args: patch_tokens(encoder, images),
                           head=_head, optimizer=_optimizer)


def run(argv=None) -> dict:
    """Train the attentive probe; returns the final {'top1', 'top5', ...}. Raises on bad input."""
    return linprobe.run(argv, ATTENTIVE)


def main(argv=None) -> int:
    return linprobe.cli(run, argv, linprobe.summarise)


if __name__ == "__main__":
    sys.exit(main())
