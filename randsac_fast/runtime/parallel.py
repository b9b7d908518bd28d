"""Process group and model parallelisation: FSDP2 per transformer block and at the root.

At world size 1 without mixed precision (the CPU) nothing is sharded: FSDP2 there only adds
parameter copies and hooks (the step trace of ``benchmarks/step_profile.py`` counts ~1,000 more
dispatched ops per ViT-B step with it). On CUDA the wrapping stays, because it carries the bf16
mixed-precision policy.

One code path for every launch: under torchrun the environment names rank and world size; a plain
``python -m`` run becomes a one-process group (an in-memory store), so the trainer always talks to
``torch.distributed`` the same way. NCCL on GPU, gloo on CPU.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
import torch.distributed as dist
from torch import nn

__all__ = ["Dist", "init_distributed", "parallelize", "transformer_blocks", "COMPILE_MODES", "compile_mode"]

#: --compile: none | block (each transformer block) | whole (forward + loss, fullgraph) |
#: whole-cudagraphs (whole, mode="reduce-overhead": CUDA-graph replay, GPU only, unmeasured so far).
COMPILE_MODES = ("none", "block", "whole", "whole-cudagraphs")


def compile_mode(value) -> str:
    """Normalise --compile (older configs said true / false for block / none)."""
    legacy = {True: "block", False: "none", "true": "block", "false": "none"}
    mode = legacy.get(value.lower() if isinstance(value, str) else value, value)
    if mode not in COMPILE_MODES:
        raise ValueError(f"--compile must be one of {', '.join(COMPILE_MODES)}; got {value!r}")
    return mode


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Join (or create) the process group and pick this rank's device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda, cpu or auto; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA device is visible; use --device cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if device == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=dev if device == "cuda" else None)
        else:  # a single process: same API, no rendezvous needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def transformer_blocks(model: nn.Module) -> list[nn.ModuleList]:
    """The model's block lists (encoder, decoder / query stream), each list once even when shared."""
    lists, seen = [], set()
    for name in ("blocks", "decoder_blocks", "query_blocks"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList) and id(blocks) not in seen:
            seen.add(id(blocks))
            lists.append(blocks)
    return lists


def parallelize(model: nn.Module, dist_info: Dist, *, ac: bool = False, compile="none",
                mixed_precision: bool | None = None, shard: bool | None = None,
                per_block: bool | None = None) -> nn.Module:
    """In place: activation checkpointing, compile (see :data:`COMPILE_MODES`), then ``fully_shard``
    each block and the root.

    mixed_precision (default: on for CUDA): bf16 parameters for compute, fp32 gradient reduction,
    fp32 master weights in the optimizer. shard (default: unless world size 1 without mixed
    precision): wrap with FSDP2; an unwrapped model gets a no-op ``set_requires_gradient_sync``.
    per_block (default: on CUDA only): one FSDP unit per transformer block (its all-gather overlaps
    the previous block's compute, and only one block's full parameters are live), else one unit at
    the root (one all-gather and one reduce-scatter per step). On CPU processes (gloo), collectives
    do not overlap compute and each costs a round trip, so per-block units only add latency: the
    digits demo at 2 processes ran 1424 img/s per-block and 2120 img/s root-only, same losses.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mode = compile_mode(compile)
    if mixed_precision is None:
        mixed_precision = dist_info.device.type == "cuda"
    if shard is None:
        shard = dist_info.world > 1 or mixed_precision
    if mode == "whole-cudagraphs" and dist_info.device.type != "cuda":
        raise ValueError("--compile whole-cudagraphs needs CUDA (CUDA-graph replay); use --compile whole on CPU")
    if not shard:
        return _whole(_blocks_only(model, ac, mode), mode)
    mesh = init_device_mesh(dist_info.device.type, (dist_info.world,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision else MixedPrecisionPolicy())
    fsdp = dict(mesh=mesh, mp_policy=policy)
    _blocks_only(model, ac, mode)
    if per_block is None:
        per_block = dist_info.device.type == "cuda"
    for blocks in transformer_blocks(model) if per_block else ():
        for block in blocks:
            fully_shard(block, **fsdp)
            if hasattr(block, "cross"):  # SAIM's query stream calls blocks through .cross, not forward
                register_fsdp_forward_method(block, "cross")
    fully_shard(model, **fsdp)
    if hasattr(model, "forward_features"):   # evaluation (k-NN monitor, probes) calls it on the root
        register_fsdp_forward_method(model, "forward_features")
    return _whole(model, mode)


def _blocks_only(model: nn.Module, ac: bool, mode: str) -> nn.Module:
    """In place: activation checkpointing and (mode 'block') per-block compile of every block."""
    for blocks in transformer_blocks(model):
        for i, block in enumerate(blocks):
            if ac:
                from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
                block = checkpoint_wrapper(block)   # recompute the block's activations in backward
                if hasattr(block, "cross"):         # the wrapper covers forward only: SAIM's query stream too
                    block.cross = functools.partial(torch.utils.checkpoint.checkpoint, block.cross,
                                                    use_reentrant=False)
            if mode == "block":
                block.compile()                     # per block: small graphs, shared across blocks
                if hasattr(block, "cross"):         # SAIM's query stream: Module.compile covers forward only
                    block.cross = torch.compile(block.cross)
            blocks[i] = block
    return model


def _whole(model: nn.Module, mode: str) -> nn.Module:
    """Modes 'whole' / 'whole-cudagraphs': the model's forward (orders split, bounds, encoder,
    decoder, loss) compiles as one fullgraph graph; the step is sync-free and shape-stable, so
    it compiles once per order family. The module itself is returned (``Module.compile``), so
    state dicts, FSDP methods and evaluation calls see the same object."""
    if mode in ("whole", "whole-cudagraphs"):
        model.compile(fullgraph=True, **({"mode": "reduce-overhead"} if mode == "whole-cudagraphs" else {}))
    if not hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync = lambda requires_gradient_sync: None   # what FSDP2 adds; no-op here
    return model
