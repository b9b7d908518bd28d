"""Every collective of the package, through one door: tensors travel on the process group's device.

NCCL has no CPU backend ("No backend type associated with device type cpu"): a tensor made on the
host (``torch.tensor([count])``) and all-reduced on an NCCL group stops a GPU run, while gloo (the
CPU tests) accepts it. So no module calls ``torch.distributed``'s collectives itself; they call
these, which place the tensor on :func:`group_device` first (a copy only when it is elsewhere) and
return the result. ``tests/test_collectives.py`` greps the package for direct calls and runs the
trainer and the evaluation collectives under a process group that, like NCCL, refuses tensors of
any other device.

Without a process group (a tool reading one checkpoint, a probe in a notebook) each function is
the identity of a one-rank group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["active", "group_device", "on_group_device", "all_reduce", "all_reduce_values", "all_gather",
           "broadcast_object", "all_gather_object", "barrier"]


def active(group=None) -> bool:
    """A process group is up (``group`` or the default one)."""
    return group is not None or (dist.is_available() and dist.is_initialized())


def group_device(group=None) -> torch.device:
    """The device ``group``'s collectives carry tensors on: the CPU when the group has a CPU backend
    (gloo), else this rank's current device of the group's one device type (NCCL: ``cuda:LOCAL_RANK``,
    set by :func:`randsac_fast.runtime.parallel.init_distributed`)."""
    if not active(group):
        return torch.device("cpu")
    types = [d.type for d in (group or dist.distributed_c10d._get_default_group())._device_types]
    if not types or "cpu" in types:
        return torch.device("cpu")
    module = getattr(torch, types[0], None)
    index = module.current_device() if module is not None and hasattr(module, "current_device") else None
    return torch.device(types[0], index)


def on_group_device(t: torch.Tensor, group=None) -> torch.Tensor:
    """``t`` on the group's device (``t`` itself when it is already there)."""
    device = group_device(group)
    same = t.device.type == device.type and (device.index is None or t.device.index == device.index)
    return t if same else t.to(device)


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """The reduction of ``t`` over ranks, on the group's device (``t`` itself, reduced in place,
    when it was already there)."""
    if not active(group):
        return t
    t = on_group_device(t, group)
    dist.all_reduce(t, op=op, group=group)
    return t


def all_reduce_values(values, dtype=torch.float64, op=dist.ReduceOp.SUM, group=None) -> list:
    """Host numbers (a list) reduced over ranks, back as a list of Python numbers."""
    return all_reduce(torch.tensor(list(values), dtype=dtype), op=op, group=group).tolist()


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape on all ranks), in rank order, on the group's device."""
    if not active(group):
        return [t]
    t = on_group_device(t, group)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return parts


def broadcast_object(obj, src: int = 0, group=None):
    """Rank ``src``'s ``obj`` (picklable) on every rank. torch places the pickled bytes on the
    group's device itself."""
    if not active(group) or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj, group=None) -> list:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not active(group) or dist.get_world_size(group) == 1:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group=None) -> None:
    """Every rank waits for all the others (on NCCL: on this rank's GPU)."""
    if not active(group):
        return
    device = group_device(group)
    dist.barrier(group=group, device_ids=[device.index] if device.type == "cuda" else None)
