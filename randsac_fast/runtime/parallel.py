"""Process group and model parallelisation: FSDP2 per transformer block and at the root.

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

__all__ = ["Dist", "init_distributed", "parallelize", "transformer_blocks"]


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


def parallelize(model: nn.Module, dist_info: Dist, *, ac: bool = False, compile: bool = False,
                mixed_precision: bool | None = None) -> nn.Module:
    """In place: activation checkpointing, per-block compile, then ``fully_shard`` each block and the root.

    mixed_precision (default: on for CUDA): bf16 parameters for compute, fp32 gradient reduction,
    fp32 master weights in the optimizer.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if mixed_precision is None:
        mixed_precision = dist_info.device.type == "cuda"
    mesh = init_device_mesh(dist_info.device.type, (dist_info.world,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision else MixedPrecisionPolicy())
    shard = dict(mesh=mesh, mp_policy=policy)
    for blocks in transformer_blocks(model):
        for i, block in enumerate(blocks):
            if ac:
                from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
                block = checkpoint_wrapper(block)   # recompute the block's activations in backward
                if hasattr(block, "cross"):         # the wrapper covers forward only: SAIM's query stream too
                    block.cross = functools.partial(torch.utils.checkpoint.checkpoint, block.cross,
                                                    use_reentrant=False)
            if compile:
                block.compile()                     # per block: small graphs, shared across blocks
                if hasattr(block, "cross"):         # SAIM's query stream: Module.compile covers forward only
                    block.cross = torch.compile(block.cross)
            fully_shard(block, **shard)
            if hasattr(block, "cross"):  # SAIM's query stream calls blocks through .cross, not forward
                register_fsdp_forward_method(block, "cross")
            blocks[i] = block
    fully_shard(model, **shard)
    if hasattr(model, "forward_features"):   # evaluation (k-NN monitor, probes) calls it on the root
        register_fsdp_forward_method(model, "forward_features")
    return model
