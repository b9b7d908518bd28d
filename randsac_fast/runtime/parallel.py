"""Process group and model parallelisation: FSDP2 per transformer block and at the root.

At world size 1 nothing is sharded by default: FSDP2 there only adds parameter copies, casts and
hooks (``benchmarks/step_profile.py`` counts them). Without mixed precision (the CPU) the model runs
as it is; with bf16 compute (CUDA) the trainer asks for :class:`MasterWeights` instead: a bf16
copy of the model computes, the fp32 model keeps the weights the optimizer and the checkpoints
see — FSDP2's mixed-precision numerics, with a few multi-tensor copies per step in place of
FSDP's per-parameter casts and all-gathers.

One code path for every launch: under torchrun the environment names rank and world size; a plain
``python -m`` run becomes a one-process group (an in-memory store), so the trainer always talks to
``torch.distributed`` the same way. NCCL on GPU, gloo on CPU.
"""
from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
import torch.distributed as dist
from torch import nn

__all__ = ["Dist", "init_distributed", "parallelize", "transformer_blocks", "COMPILE_MODES", "compile_mode",
           "MasterWeights"]

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


class MasterWeights:
    """bf16 compute with fp32 master weights, without FSDP (world size 1).

    ``master`` (the model handed in, fp32) is what the optimizer, the checkpoints, the gradient
    norm and ``train_flops`` see; ``compute`` is a copy whose parameters are ``dtype``, and the
    master's ``forward`` / ``forward_features`` run it. Inputs are not cast: the images stay fp32
    into the targets (as MAE computes them), and the patch embedding reads them in its own dtype;
    FSDP2's root is wrapped with ``cast_forward_inputs=False`` to match. The owner of the step
    calls :meth:`grads_to_master` after each backward (the bf16 gradients are copied — first
    micro-batch — or added into persistent fp32 buffers that become the masters' ``.grad``) and
    :meth:`params_to_compute` after each optimizer step and each checkpoint load (one multi-tensor
    copy, rounding to ``dtype``). The numerics are
    FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` at world size 1 (tested
    against it); what goes away is FSDP's per-parameter casts, all-gathers and hooks.
    """

    def __init__(self, master: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.master, self.dtype = master, dtype
        self.compute = copy.deepcopy(master)
        with torch.no_grad():
            for p in self.compute.parameters():
                p.data = p.data.to(dtype)
        self.pairs = list(zip(master.parameters(), self.compute.parameters()))
        self.grads: list[torch.Tensor | None] = [None] * len(self.pairs)   # fp32, allocated once
        self.written = [False] * len(self.pairs)                           # this step's buffers

    def attach(self) -> nn.Module:
        """Route the master's calls to the compute copy; returns the master."""
        m, compute = self.master, self.compute
        m.master_weights = self
        m.forward = lambda *args, **kwargs: compute(*args, **kwargs)
        if hasattr(m, "forward_features"):
            m.forward_features = compute.forward_features
        return m

    @torch.no_grad()
    def grads_to_master(self) -> None:
        """Move the compute copy's gradients (set to None after) into the masters' fp32 ``.grad``."""
        fresh, fresh_src, acc, acc_src = [], [], [], []
        for i, (m, c) in enumerate(self.pairs):
            if c.grad is None:
                continue
            if self.grads[i] is None:
                self.grads[i] = torch.empty_like(m, memory_format=torch.contiguous_format)
            dst, src = (acc, acc_src) if self.written[i] else (fresh, fresh_src)
            dst.append(self.grads[i])
            src.append(c.grad)
            self.written[i] = True
            m.grad = self.grads[i]
            c.grad = None
        if fresh:
            torch._foreach_copy_(fresh, fresh_src)
        if acc:
            torch._foreach_add_(acc, acc_src)

    @torch.no_grad()
    def params_to_compute(self) -> None:
        """Round the master weights into the compute copy (after a step or a load)."""
        self.written = [False] * len(self.pairs)
        torch._foreach_copy_([c for _, c in self.pairs], [m for m, _ in self.pairs])


def parallelize(model: nn.Module, dist_info: Dist, *, ac: bool = False, compile="none",
                mixed_precision: bool | None = None, shard: bool | None = None,
                per_block: bool | None = None, master_weights: bool = False) -> nn.Module:
    """In place: activation checkpointing, compile (see :data:`COMPILE_MODES`), then ``fully_shard``
    each block and the root.

    mixed_precision (default: on for CUDA): bf16 parameters for compute, fp32 gradient reduction,
    fp32 master weights in the optimizer. master_weights: at world size 1 with mixed precision,
    use :class:`MasterWeights` instead of FSDP2 (the caller then calls its two methods in the
    step; the trainer does). shard (default: at world size > 1, or for mixed precision without
    master_weights): wrap with FSDP2; an unwrapped model gets a no-op ``set_requires_gradient_sync``.
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
    master_weights = master_weights and mixed_precision and dist_info.world == 1 and not shard
    if shard is None:
        shard = dist_info.world > 1 or (mixed_precision and not master_weights)
    if mode == "whole-cudagraphs" and dist_info.device.type != "cuda":
        raise ValueError("--compile whole-cudagraphs needs CUDA (CUDA-graph replay); use --compile whole on CPU")
    if master_weights:
        mixed = MasterWeights(model)
        _whole(_blocks_only(mixed.compute, ac, mode), mode)
        return _whole(mixed.attach(), "none")
    if not shard:
        return _whole(_blocks_only(model, ac, mode), mode)
    mesh = init_device_mesh(dist_info.device.type, (dist_info.world,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision else MixedPrecisionPolicy())
    fsdp = dict(mesh=mesh, mp_policy=policy)
    # The root takes the images: they stay fp32 for the targets (the patch embedding casts what it reads).
    root_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                        cast_forward_inputs=False) if mixed_precision else policy)
    _blocks_only(model, ac, mode)
    if per_block is None:
        per_block = dist_info.device.type == "cuda"
    for blocks in transformer_blocks(model) if per_block else ():
        for block in blocks:
            fully_shard(block, **fsdp)
            if hasattr(block, "cross"):  # SAIM's query stream calls blocks through .cross, not forward
                register_fsdp_forward_method(block, "cross")
    fully_shard(model, mesh=mesh, mp_policy=root_policy)
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
