"""Benchmark: what one steady-state training step dispatches — ops, kernels, host syncs, shapes.

    python benchmarks/step_profile.py [--backend sdpa|reference|triton] [--batch 2] [--out benchmarks/results/]

Counts, not times: a ``TorchDispatchMode`` records every op of one training step after warm-up
(the trainer's own ``Trainer.train_step``: order sampling, forward + loss, backward, gradient norm /
clipping, AdamW), for three configurations:

* ``RandSAC-192 square:16/4``: ``randsac_vit_base`` (192 px, P=16, 12x12 grid, 8-layer decoder),
  skip memory on;
* ``RandSAC-192 blob:11/5``: the same model on hierarchical blob orders;
* ``SAIM-224 random``: ``saim_vit_base`` (224 px, query_depth 12, blur 9).

each in the wrappings of ``--wraps`` (world size 1): ``none`` (fp32, unwrapped: the CPU default),
``fsdp`` (fp32, FSDP2 per block), ``fsdp-bf16`` (FSDP2 per block with the bf16 mixed-precision
policy: the CUDA default before master weights) and ``master-bf16`` (the trainer's CUDA default
at world size 1: :class:`~randsac_fast.runtime.parallel.MasterWeights`, a bf16 compute copy and
fp32 masters, no FSDP), so the cost of each wrapping shows. The bf16 rows compute in bf16 on the
CPU too, so their casts and copies are counted as a GPU would launch them — except FSDP2's
copy-in / copy-out, which on a GPU are a few multi-tensor kernels per unit but per-parameter
copies on a CPU (the ``copy_`` counts of ``fsdp`` rows overstate a GPU's). Reported per row:

* ``fwd_aten`` / ``bwd_aten`` / ``other_aten`` / ``optim_aten``: aten ops dispatched in the forward
  + loss, the backward (ops run by the autograd engine), the rest of the step (order sampling,
  gradient norm) and ``optimizer.step``; an eager GPU step launches roughly one kernel per op.
* ``kernel_ops`` (``fwd_kernel_ops``, ``bwd_kernel_ops``): the aten ops among those that compute,
  i.e. all but views (``OpOverload.is_view``: view, t, transpose, select, detach, ...) and
  allocation / metadata ops (:data:`NO_KERNEL_OPS`) — what launches a kernel on a GPU. ``launches``:
  the step's estimated GPU kernel launches = ``kernel_ops`` + the computing aten ops inside custom
  ops (``inner_kernel_ops``) + Triton launches.
* ``fwd_custom`` / ``bwd_custom``: calls of the project's ``torch.library`` ops (attention, skip
  memory, targets); the aten ops *inside* them are counted apart (``inner_aten``), and so are
  Triton kernel launches (``triton_launches``, when the backend is ``triton``).
* ``searchsorted``: bound-building searches, inside custom ops included.
* ``host_syncs`` (by phase in ``sync_kinds``): ops that make the host wait for the device — ``aten._local_scalar_dense`` (``.item()``,
  ``bool()``, ``int()``), ``is_nonzero``, ``nonzero``, ``equal``, ``masked_select``, ``unique``, plus
  ``Tensor.tolist()`` / ``.numpy()`` (which dispatch nothing on CPU, so they are hooked in Python),
  plus device->host copies, plus blocking host->device copies, counted from the forward on (the
  order sampler runs on the host by design; its own reads of host tensors are not syncs). Reads
  inside ``optimizer.step`` are reported apart (``optim_host_reads``): non-fused AdamW reads its
  step counters, which live on the host, so they are no device sync on a GPU either.
* ``h2d_blocking``: ``Tensor.to(device)`` calls of host tensors with ``non_blocking=False`` anywhere in
  the step (hooked in Python: on a CPU run host and device are the same, so the copy dispatches
  nothing, but the call and its flag are still seen). Whether the source is pinned can only be
  checked on a CUDA run (``h2d_unpinned``).
* ``shapes_10``: distinct shape signatures (the shapes of every tensor argument of every op, in
  order) of the forward over 10 batches of fresh random orders — 1 means a compiled graph and
  the autotuners never see a new shape.
* ``alloc_mib``: MiB of new tensor storage the step's ops create (sum over the step, not the
  peak); on CUDA also the caching allocator's ``allocated_bytes`` delta.

What a CPU run cannot see: time, kernel fusion by the compiler (this is the eager step), whether a
host->device source is pinned, and device->host copies that a CUDA-only code path would make.
The Triton backend runs under ``TRITON_INTERPRET=1`` on CPU (slow: minutes at ViT-B), or with
``--kernels stand-in``, which counts each launch without running it (:func:`triton_stand_in`);
``sdpa`` and ``reference`` count the same model ops with their own attention ops. With
``--backend triton`` the targets / loss and skip-memory ops run their Triton kernels too (on a GPU
``auto`` picks them; on a CPU it would pick the reference ops). Each row says its
backend and whether its kernels ran.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import inspect
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, provenance, report  # noqa: E402
from randsac_fast import config as config_mod, models, ops, orders  # noqa: E402
from randsac_fast.train.trainer import Trainer, param_groups  # noqa: E402

#: aten ops that launch no kernel on a GPU besides the views (``OpOverload.is_view``): allocations and
#: metadata-only reshapes.
NO_KERNEL_OPS = {"empty", "empty_strided", "empty_like", "_unsafe_view", "lift_fresh", "new_empty",
                 "new_empty_strided", "set_", "resize_"}

SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "masked_select", "unique",
            "_unique2", "unique_consecutive", "item"}

CONFIGS = {  # name: (model, overrides, order spec)
    "RandSAC-192 square:16/4": ("randsac_vit_base", dict(skip_memory=True), "square:16/4"),
    "RandSAC-192 blob:11/5": ("randsac_vit_base", dict(skip_memory=True), "blob:11/5"),
    "SAIM-224 random": ("saim_vit_base", {}, "random"),
}


def _storage(t: torch.Tensor):
    """(data pointer, bytes) of a tensor's storage, or None (meta, fake or freed storages)."""
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError):
        return None


class StepTrace(TorchDispatchMode):
    """Counts the ops of what runs under it, by phase (fwd / bwd / other) and kind."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()       # (phase, kind) -> n
        self.ops = collections.Counter()          # (phase, op name) -> n
        self.kernel_ops = collections.Counter()   # (phase, op name) -> n, the kernel-launching ones
        self.syncs = collections.Counter()        # op name -> n (forward on)
        self.phase = "other"
        self.synced_phase = False                 # True from the forward on
        self.depth = 0                            # > 0 inside a custom op
        self.alloc_bytes = 0
        self.shapes: list = []

    def _phase(self) -> str:
        return "bwd" if torch._C._current_graph_task_id() >= 0 else self.phase

    def sync(self, what: str) -> None:
        if self.synced_phase:
            self.syncs[f"{self._phase()}:{what}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0] if hasattr(func, "__name__") else str(func)
        ns = func.namespace
        phase = self._phase()
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        self.shapes.append((ns, name, tuple(tuple(t.shape) for t in tensors)))
        if name == "searchsorted":
            self.counts[(phase, "searchsorted")] += 1
        if ns == "aten" and name in SYNC_OPS:
            self.sync(name)
        if ns == "aten" and name in ("_to_copy", "copy_"):
            self._copy(name, args, kwargs)
        if ns not in ("aten", "prim", "prims"):
            self.counts[(phase, "custom")] += 1
            self.ops[(phase, f"{ns}::{name}")] += 1
            opdef = torch._library.custom_ops.OPDEFS.get(f"{ns}::{name}")
            if opdef is not None and self.depth == 0:   # run its body under the trace: see inside
                self.depth += 1
                try:
                    with self:
                        out = opdef._init_fn(*args, **kwargs)
                finally:
                    self.depth -= 1
                self._count_alloc(out, tensors)
                return out
        else:
            self.counts[(phase, "inner_aten" if self.depth else "aten")] += 1
            if not (getattr(func, "is_view", False) or name in NO_KERNEL_OPS):
                self.counts[(phase, "inner_kernel_ops" if self.depth else "kernel_ops")] += 1
                self.kernel_ops[(phase, name)] += 1
            self.ops[(phase, name)] += 1
        out = func(*args, **kwargs)
        self._count_alloc(out, tensors)
        return out

    def _copy(self, name, args, kwargs) -> None:
        src = args[0] if name == "_to_copy" else args[1]
        dst_dev = kwargs.get("device") if name == "_to_copy" else args[0].device
        if dst_dev is None or not isinstance(src, torch.Tensor):
            return
        dst_dev = torch.device(dst_dev)
        if src.device.type != "cpu" and dst_dev.type == "cpu":
            self.sync("device->host copy")
        elif src.device.type == "cpu" and dst_dev.type != "cpu":
            if not kwargs.get("non_blocking", False if name == "_to_copy" else args[2] if len(args) > 2 else False):
                self.sync("blocking host->device copy")
            if not src.is_pinned():
                self.counts[("other", "h2d_unpinned")] += 1

    def _count_alloc(self, out, inputs) -> None:
        seen = {s[0] for s in map(_storage, inputs) if s is not None}
        flat, _ = tree_flatten(out)
        for t in flat:
            s = _storage(t) if isinstance(t, torch.Tensor) else None
            if s is not None and s[0] not in seen:
                seen.add(s[0])
                self.alloc_bytes += s[1]


@contextlib.contextmanager
def python_hooks(trace: StepTrace):
    """Hook what dispatches nothing on CPU: Tensor.tolist / .numpy (syncs on a device) and the
    non_blocking flag of Tensor.to (a host->device copy on a GPU run), and Triton launches."""
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "to")}

    def reader(name):
        def read(self, *a, **k):
            trace.sync(f"Tensor.{name}")
            return saved[name](self, *a, **k)
        return read

    def to(self, *a, **k):
        device = k.get("device", a[0] if a and isinstance(a[0], (str, torch.device)) else None)
        if device is not None and self.device.type == "cpu" and not k.get("non_blocking", False):
            trace.counts[(trace._phase(), "h2d_blocking")] += 1
        return saved["to"](self, *a, **k)

    torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.to = reader("tolist"), reader("numpy"), to
    launches = []
    try:
        import triton.runtime.interpreter as interp
        import triton.runtime.jit as jit
        for cls in (interp.InterpretedFunction, jit.JITFunction):
            original = cls.run

            def run(self, *a, _original=original, **k):
                trace.counts[(trace._phase(), "triton_launches")] += 1
                with _disable_current_modes():    # the interpreter's own tensor work is not the step's
                    return _original(self, *a, **k)
            launches.append((cls, original))
            cls.run = run
    except ImportError:
        pass
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        for cls, original in launches:
            cls.run = original


@contextlib.contextmanager
def triton_stand_in():
    """Launch no Triton kernel: every launch returns at once and its outputs keep whatever their
    buffers held. For counting only — the step has no data-dependent control flow once the
    first-step checks are off (``tests/test_step_profile.py`` checks that a small model's trace is
    identical with the interpreter and with the stand-in), so the counts are the real path's, without
    the interpreter's minutes per ViT-B step. Outputs are garbage: nothing here reads them."""
    patched = []
    try:
        import triton.runtime.interpreter as interp
        import triton.runtime.jit as jit
        for cls in (interp.InterpretedFunction, jit.JITFunction):
            patched.append((cls, cls.run))
            cls.run = lambda self, *a, **k: None
    except ImportError:
        pass
    try:
        yield
    finally:
        for cls, original in patched:
            cls.run = original


class PhaseHooks:
    """Marks the model's forward (and the loss inside it) as phase 'fwd' on the trace, and the
    optimizer step as 'optim'."""

    def __init__(self, model, optimizer, trace: StepTrace):
        self.trace = trace
        self.handles = [model.register_forward_pre_hook(self.pre), model.register_forward_hook(self.post),
                        optimizer.register_step_pre_hook(self.optim), optimizer.register_step_post_hook(self.done)]

    def optim(self, *args):
        self.trace.phase = "optim"

    def done(self, *args):
        self.trace.phase = "other"

    def pre(self, module, args):
        self.trace.phase = "fwd"
        self.trace.synced_phase = True

    def post(self, module, args, out):
        self.trace.phase = "other"

    def remove(self):
        for h in self.handles:
            h.remove()


WRAPS = ("none", "fsdp", "fsdp-bf16", "master-bf16")


def _wrap_name(wrap) -> str:
    return {False: "none", True: "fsdp"}.get(wrap, wrap) if isinstance(wrap, bool) else wrap


def build_step(name: str, backend: str, batch: int, wrap="none", seed: int = 0):
    """A stand-in Trainer (just what ``Trainer.train_step`` reads) for one configuration."""
    from randsac_fast.runtime.parallel import init_distributed, parallelize
    model_name, overrides, spec = CONFIGS[name]
    torch.manual_seed(seed)
    model = models.build(model_name, backend=backend, **overrides)
    if backend == "triton":
        # On a GPU the targets / skip-memory ops resolve ("auto") to their Triton kernels too; on a
        # CPU "auto" picks the reference ops, so name the kernels the GPU step would launch.
        model.aux_backend = lambda: "triton"
    cfg = config_mod.Config()
    cfg.train.batch_size, cfg.train.accum, cfg.train.order = batch, 1, spec
    dist_info = init_distributed("auto")
    device = dist_info.device
    model = model.to(device)
    wrap = _wrap_name(wrap)
    fsdp = wrap.startswith("fsdp")
    params = inspect.signature(parallelize).parameters
    if "master_weights" in params:              # the trainer's own wrapping, forced to this row's
        model = parallelize(model, dist_info, shard=fsdp, per_block=True, mixed_precision=wrap.endswith("bf16"),
                            master_weights=wrap == "master-bf16")
    elif wrap == "master-bf16" or (wrap == "fsdp-bf16" and "mixed_precision" not in params):
        raise SystemExit(f"--wraps {wrap}: this commit's parallelize cannot do it")
    elif "shard" in params:
        model = parallelize(model, dist_info, shard=fsdp, per_block=True,   # the CUDA layout
                            **({"mixed_precision": True} if wrap == "fsdp-bf16" else {}))
    elif fsdp:                                  # older commits: FSDP2 always, per block
        model = parallelize(model, dist_info, compile=False,
                            **({"mixed_precision": True} if wrap == "fsdp-bf16" else {}))
    if not hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync = lambda flag: None   # what FSDP adds; a no-op unwrapped
    # The trainer's optimizer as it runs on a GPU: AdamW's CUDA default is foreach (or fused where
    # the trainer asks for it); on CPU torch would pick the per-parameter loop, so say foreach.
    fused = getattr(Trainer, "FUSED_ADAMW", False)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=1e-4,
                                  **({"fused": True} if fused else {"foreach": True}))
    trainer = SimpleNamespace(cfg=cfg, model=model, optimizer=optimizer, device=device, step=0, micro=0,
                              mixed=getattr(model, "master_weights", None),
                              plan=SimpleNamespace(accum=1, global_batch=batch),
                              total_steps=1000, warmup=10, peak_lr=1e-4, grid=model.grid,
                              order_spec=orders.check_fits(spec, model.grid),
                              order_gen=torch.Generator().manual_seed(seed + 1))
    for attr in ("_grad_norm_due",):           # helpers the step may call, when the Trainer has them
        if hasattr(Trainer, attr):
            setattr(trainer, attr, getattr(Trainer, attr).__get__(trainer))
    g = torch.Generator().manual_seed(seed + 2)
    h, w = (model.img_size if isinstance(model.img_size, tuple) else (model.img_size,) * 2)

    def stream():
        while True:
            yield torch.randn(batch, model.in_chans, h, w, generator=g), None, 0
    return trainer, stream(), model


def profile(name: str, backend: str, batch: int, wrap="none", warmup: int = 2, count_shapes: bool = True,
            stand_in: bool = False) -> dict:
    """wrap: one of :data:`WRAPS` (or False / True for none / fsdp)."""
    with triton_stand_in() if stand_in else contextlib.nullcontext():
        return _profile(name, backend, batch, _wrap_name(wrap), warmup, count_shapes, stand_in)


def _profile(name, backend, batch, wrap, warmup, count_shapes, stand_in) -> dict:
    trainer, stream, model = build_step(name, backend, batch, wrap)
    step = Trainer.train_step
    t0 = time.perf_counter()
    if stand_in:                                # the outputs are garbage: the value checks would refuse them
        ops.set_checks(False)
    for i in range(warmup):                     # the first step validates inputs (syncs), as in the trainer
        step(trainer, stream)
        if i == 0:
            ops.set_checks(False)
    warm_s = time.perf_counter() - t0
    trace = StepTrace()
    hooks = PhaseHooks(model, trainer.optimizer, trace)
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()["allocated_bytes.all.allocated"]
    t0 = time.perf_counter()
    with python_hooks(trace), trace:
        step(trainer, stream)
    traced_s = time.perf_counter() - t0
    cuda_alloc = (torch.cuda.memory_stats()["allocated_bytes.all.allocated"] - before) if cuda else None
    # shapes: the forward alone over 10 batches of fresh orders
    signatures = set()
    with torch.no_grad():
        for _ in range(10 if count_shapes else 0):
            images = next(stream)[0].to(trainer.device)
            order = orders.sample(trainer.order_spec, batch, trainer.grid, generator=trainer.order_gen,
                                  device=trainer.device)
            shape_trace = StepTrace()
            with shape_trace:
                model(images, order)
            signatures.add(tuple(shape_trace.shapes))
    hooks.remove()
    ops.set_checks(True)
    c = trace.counts
    row = {
        "config": name, "backend": backend, "wrap": wrap, "batch": batch,
        "kernels": "stand-in (launch counted, not run)" if stand_in else "run",
        "fwd_aten": c[("fwd", "aten")], "bwd_aten": c[("bwd", "aten")], "other_aten": c[("other", "aten")],
        "optim_aten": c[("optim", "aten")],
        "total_aten": c[("fwd", "aten")] + c[("bwd", "aten")] + c[("other", "aten")] + c[("optim", "aten")],
        "fwd_custom": c[("fwd", "custom")], "bwd_custom": c[("bwd", "custom")],
        "inner_aten": sum(v for (p, k), v in c.items() if k == "inner_aten"),
        "kernel_ops": sum(v for (p, k), v in c.items() if k == "kernel_ops"),
        "fwd_kernel_ops": c[("fwd", "kernel_ops")], "bwd_kernel_ops": c[("bwd", "kernel_ops")],
        "inner_kernel_ops": sum(v for (p, k), v in c.items() if k == "inner_kernel_ops"),
        "triton_launches": sum(v for (p, k), v in c.items() if k == "triton_launches"),
        "launches": sum(v for (p, k), v in c.items() if k in ("kernel_ops", "inner_kernel_ops", "triton_launches")),
        "searchsorted": sum(v for (p, k), v in c.items() if k == "searchsorted"),
        "host_syncs": sum(v for k, v in trace.syncs.items() if not k.startswith("optim:")),
        "optim_host_reads": sum(v for k, v in trace.syncs.items() if k.startswith("optim:")),
        "sync_kinds": dict(trace.syncs),
        "h2d_blocking": sum(v for (p, k), v in c.items() if k == "h2d_blocking" and p != "optim"),
        "h2d_unpinned": sum(v for (p, k), v in c.items() if k == "h2d_unpinned") if cuda else None,
        "shapes_10": len(signatures) if count_shapes else None, "alloc_mib": round(trace.alloc_bytes / 2**20, 1),
        "cuda_alloc_mib": None if cuda_alloc is None else round(cuda_alloc / 2**20, 1),
        "warmup_s": round(warm_s, 1), "traced_step_s": round(traced_s, 1),
        "h2d_blocking_by_phase": {p: v for (p, k), v in c.items() if k == "h2d_blocking"},
        "top_ops": {p: dict(collections.Counter({k: v for (ph, k), v in trace.ops.items() if ph == p}).most_common(15))
                    for p in ("fwd", "bwd", "other", "optim")},
        "kernel_ops_by_name": {p: dict(collections.Counter({k: v for (ph, k), v in trace.kernel_ops.items()
                                                            if ph == p}).most_common())
                               for p in ("fwd", "bwd", "other", "optim")},
    }
    del trainer, model
    gc.collect()
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="sdpa", help="attention backend of the models (sdpa, reference, triton, ...)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2, help="untraced steps first (the first one validates inputs)")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--wraps", default="none,fsdp",
                   help=f"comma-separated wrappings to trace, of {', '.join(WRAPS)} (see the module docstring)")
    p.add_argument("--no-fsdp", dest="fsdp", action="store_false", help="only the unwrapped rows (--wraps none)")
    p.add_argument("--label", default="", help="tag for the JSON file name, e.g. before / after")
    p.add_argument("--kernels", choices=("run", "stand-in"), default="run",
                   help="stand-in: count Triton launches without running them (see triton_stand_in); the "
                        "Triton backend on CPU needs TRITON_INTERPRET=1 either way")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    wraps = [w for w in args.wraps.split(",") if w] if args.fsdp else ["none"]
    for w in wraps:
        if w not in WRAPS:
            p.error(f"--wraps: {w!r} is not one of {', '.join(WRAPS)}")
    rows = []
    for name in args.configs:
        for wrap in wraps:
            row = profile(name, args.backend, args.batch, wrap, args.warmup, count_shapes=wrap == "none",
                          stand_in=args.kernels == "stand-in")
            rows.append(row)
            print(f"{name} [{row['wrap']}]: {row['total_aten']} aten ops, {row['host_syncs']} syncs "
                  f"({row['traced_step_s']} s)", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = {"benchmark": "step_profile", **provenance(device, "cpu (dispatch counts; no timings)"),
            "backend": args.backend, "kernels": args.kernels, "batch": args.batch, "warmup_steps": args.warmup, "label": args.label,
            "shapes": {n: {"model": m, "overrides": o, "order": s} for n, (m, o, s) in CONFIGS.items()
                       if n in args.configs},
            "what_cpu_cannot_see": "time; compiler fusion; whether h2d sources are pinned; CUDA-only copies"}
    columns = ["config", "backend", "wrap", "launches", "fwd_kernel_ops", "bwd_kernel_ops", "kernel_ops",
               "fwd_aten", "bwd_aten", "other_aten", "optim_aten", "total_aten",
               "fwd_custom", "bwd_custom", "inner_aten", "triton_launches", "searchsorted", "host_syncs",
               "optim_host_reads", "h2d_blocking", "shapes_10", "alloc_mib"]
    report(f"step_profile_{args.backend}" + (f"_{args.label}" if args.label else ""), rows, columns, meta, args.out)


if __name__ == "__main__":
    main()
