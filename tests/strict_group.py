"""A device-strict process group on the CPU: collectives refuse tensors that are not on the compute
device, as NCCL refuses CPU tensors ("No backend type associated with device type cpu").

On a CPU the compute device *is* the CPU, so a host tensor in a collective cannot be told apart from
a device one. This module therefore makes a second device type, ``emu``: PyTorch's PrivateUse1 key
as a Python backend, whose tensors wrap CPU tensors (every op unwraps, runs on the CPU, wraps the
result). A model moved ``.to("emu")`` trains exactly as on the CPU; a tensor made on the host stays
``cpu``. The process group ``strict`` (gloo underneath) carries ``emu`` tensors only.

Importing this module changes process-wide state that cannot be undone (PrivateUse1 is renamed and
becomes an available accelerator): import it only in a subprocess of its own (see
``tests/test_collectives.py``). ``use_strict_group()`` then sends the trainer and the evaluation
commands there: ``init_distributed`` joins the strict group and names ``emu:0`` the device.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.utils.backend_registration as backend_registration
from torch.utils._python_dispatch import return_and_correct_aliasing
from torch.utils._pytree import tree_map

DEVICE_TYPE = "emu"


class _Stream:
    """The one stream of the emulated device: work is done when an op returns."""

    def synchronize(self) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass


class _EmuModule(backend_registration._DummyBackendModule):
    """``torch.emu``: what torch asks of a device module (DCP: streams; here all synchronous)."""
    _stream = _Stream()

    def current_stream(self, device=None):
        return self._stream

    def stream(self, stream):
        return contextlib.nullcontext()

    def synchronize(self, device=None) -> None:
        pass


backend_registration._setup_privateuseone_for_python_backend(DEVICE_TYPE, backend_module=_EmuModule())
DEVICE = torch.device(DEVICE_TYPE, 0)
CPU = torch.device("cpu")


class EmuTensor(torch.Tensor):
    """A tensor on ``emu:0`` holding a CPU tensor (``.host``) that shares its storage."""

    @staticmethod
    def __new__(cls, host: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, host.shape, strides=host.stride(),
                                                   storage_offset=host.storage_offset(), dtype=host.dtype,
                                                   device=DEVICE, requires_grad=host.requires_grad)

    def __init__(self, host: torch.Tensor):
        self.host = host

    def __repr__(self):
        return f"EmuTensor({self.host!r})"

    def tolist(self):   # a device -> host read, as on a GPU (not dispatched: torch refuses subclasses)
        return self.detach().to(CPU).tolist()

    def __tensor_flatten__(self):
        return ["host"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return EmuTensor(inner["host"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return return_and_correct_aliasing(func, args, kwargs or {}, _run(func, args, kwargs or {}))


def _on_emu(device) -> bool:
    return device is not None and torch.device(device).type == DEVICE_TYPE


def _run(func, args, kwargs):
    """``func`` on the host tensors; results wrapped as ``emu`` unless the op moved them to the CPU."""
    to_host = "device" in kwargs and kwargs["device"] is not None and not _on_emu(kwargs["device"])
    if _on_emu(kwargs.get("device")):
        kwargs = dict(kwargs, device=CPU)
    unwrap = lambda x: x.host if isinstance(x, EmuTensor) else x   # noqa: E731
    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    if to_host:
        return out
    return tree_map(lambda x: EmuTensor(x) if isinstance(x, torch.Tensor) else x, out)


# Ops with no emu tensor argument (factories with device="emu") reach the PrivateUse1 key.
_fallback_lib = torch.library.Library("_", "IMPL")
_fallback_lib.fallback(lambda op, *args, **kwargs: _run(op, args, kwargs), "PrivateUse1")


def _copy_from(src, dst, non_blocking=False):
    """host -> emu copies (``torch.tensor(..., device="emu")`` copies with Python dispatch off)."""
    (dst.host if isinstance(dst, EmuTensor) else dst).copy_(src.host if isinstance(src, EmuTensor) else src)
    return dst


_aten_lib = torch.library.Library("aten", "IMPL")
_aten_lib.impl("_copy_from", _copy_from, "PrivateUse1")


def _hosts(tensors, collective: str) -> list[torch.Tensor]:
    """The CPU tensors behind ``tensors``, after refusing any that is not on the compute device."""
    for t in tensors:
        if t.device.type != DEVICE_TYPE:
            raise RuntimeError(f"device-strict process group: {collective} got a tensor on {t.device}; "
                               f"collectives carry tensors on {DEVICE_TYPE} only (as NCCL: cuda only)")
    return [t.host for t in tensors]


class StrictGroup(dist.ProcessGroup):
    """gloo underneath; every tensor a collective carries must be an ``emu`` tensor."""

    def __init__(self, store, rank: int, world: int):
        super().__init__(rank, world)
        self.gloo = dist.ProcessGroupGloo(store, rank, world)

    @property
    def _device_types(self):   # what torch asks to place object collectives and barriers
        return [DEVICE]

    def getBackendName(self):
        return "strict"

    def allreduce(self, tensors, opts=None):
        return self.gloo.allreduce(_hosts(tensors, "all_reduce"), opts or dist.AllreduceOptions())

    def allgather(self, outputs, inputs, opts=None):
        from torch._C._distributed_c10d import AllgatherOptions
        return self.gloo.allgather([_hosts(o, "all_gather") for o in outputs], _hosts(inputs, "all_gather"),
                                   opts or AllgatherOptions())

    def _allgather_base(self, output, input, opts=None):
        from torch._C._distributed_c10d import AllgatherOptions
        [out], [inp] = _hosts([output], "all_gather_into_tensor"), _hosts([input], "all_gather_into_tensor")
        return self.gloo._allgather_base(out, inp, opts or AllgatherOptions())

    def gather(self, outputs, inputs, opts=None):
        return self.gloo.gather([_hosts(o, "gather") for o in outputs], _hosts(inputs, "gather"),
                                opts or dist.GatherOptions())

    def scatter(self, outputs, inputs, opts=None):
        return self.gloo.scatter(_hosts(outputs, "scatter"), [_hosts(i, "scatter") for i in inputs],
                                 opts or dist.ScatterOptions())

    def broadcast(self, tensors, opts=None):
        return self.gloo.broadcast(_hosts(tensors, "broadcast"), opts or dist.BroadcastOptions())

    def barrier(self, opts=None):
        return self.gloo.barrier(opts or dist.BarrierOptions())


dist.Backend.register_backend("strict", lambda store, rank, world, timeout: StrictGroup(store, rank, world),
                              devices=[DEVICE_TYPE])


def init_strict(device: str = "auto"):
    """``init_distributed`` for the strict group: a one-process group, compute device ``emu:0``."""
    from randsac_fast.runtime.parallel import Dist
    if not dist.is_initialized():
        dist.init_process_group("strict", store=dist.HashStore(), rank=0, world_size=1)
    return Dist(0, 1, 0, DEVICE)


def use_strict_group() -> None:
    """Route the trainer's and the evaluation commands' ``init_distributed`` to :func:`init_strict`."""
    from randsac_fast.eval import finetune, linprobe
    from randsac_fast.runtime import parallel
    from randsac_fast.train import trainer
    for module in (parallel, trainer, linprobe, finetune):
        module.init_distributed = init_strict
