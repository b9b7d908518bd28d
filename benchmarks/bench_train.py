"""Benchmark: end-to-end training steps of ViT-B RandSAC, SAIM and AIM, dense reference vs our backends.

    python benchmarks/bench_train.py [--model randsac|saim|aim|both|all] [--quick] [--out benchmarks/results/]

One training step = forward, backward and an AdamW step (fused on CUDA) on synthetic images,
bf16 autocast, one device, for each model:

* RandSAC-192: ``randsac_vit_base`` (192 px, P=16, 12x12 grid, 8-layer decoder, skip memory on),
  order ``square:16/4``.
* SAIM-224: ``saim_vit_base`` (224 px, P=16, query_depth 12, blur 9), order ``random``.
* AIM-224: ``aim_vit_base`` (224 px, P=14, 16x16 grid, 12-block MLP head), order ``prefix`` (a
  prefix-causal mask, the prefix drawn per image). ``both`` = RandSAC + SAIM, ``all`` adds AIM.

Rows, all in one run so the ratios are side by side:

* ``dense``   the dense reference (``randsac_fast.models.dense``): raster order, (B, N, N) masks,
  unfused ``softmax(QK^T)V`` — how the papers' code runs.
* ``sdpa``, ``flex``, ``triton``, ``cuda`` (and ``reference``): our permuted-order model with that
  attention backend; ``triton`` / ``cuda`` also use the fused Triton targets and skip memory.
  A backend that cannot run here is reported as unavailable.

each eager and compiled. ``--compile-scope block`` (default, as the trainer does it) compiles each
transformer block (SAIM's query-stream ``cross`` too) and leaves the order split and the loss
eager; ``model`` compiles the whole loss call. The dense reference does not go through the block
modules, so its compiled row always compiles the whole loss function.

Reported per row: img/s (batch / median step time over the timed steps after warmup, each step
synchronised), MFU = ``model.train_flops(order)`` (matmuls only, visible attention pairs only) x
steps/s over the device's dense bf16 peak (from its name, or ``--peak-tflops``) — the same useful
FLOPs for every row, so the dense reference's masked-out work earns it nothing —, peak memory of
the row (``torch.cuda.max_memory_allocated`` above what was allocated before it), and ratios to
the dense reference. A ``torch.profiler`` breakdown (top kernels by device time, and their share by
kernel-name family) of our fastest row follows. The table is printed last; JSON with provenance
and every step time is written (and rewritten after each row, so a killed run keeps its rows) to
``--out``. ``--tiny`` runs a tiny configuration on the CPU in seconds: a smoke test of the script,
its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, format_table, provenance, result_path, synchronize  # noqa: E402
from randsac_fast import models, ops, orders  # noqa: E402
from randsac_fast.runtime.metrics import peak_flops  # noqa: E402
from randsac_fast.models import dense  # noqa: E402
from randsac_fast.runtime.parallel import transformer_blocks  # noqa: E402

OURS = ("reference", "sdpa", "flex", "triton", "cuda")
GPU_BACKENDS = ("dense", "sdpa", "flex", "triton", "cuda")
CPU_BACKENDS = ("dense", "reference", "sdpa")


@dataclass(frozen=True)
class Setup:
    """One model to benchmark: how to build it, its order spec, its dense reference loss."""
    name: str
    build: Callable[[], torch.nn.Module]
    spec: str
    dense_loss: Callable


def setups(tiny: bool) -> dict[str, Setup]:
    if tiny:   # same structure, toy sizes: 32 px, P=4 -> 8x8 grid (square:16/4 still fits); head dim 32,
        small = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)   # the cuda kernels' least
        return {
            "randsac": Setup("randsac", lambda: models.build("randsac_vit_tiny", **small, decoder_depth=2,
                                                             skip_memory=True), "square:16/4",
                             dense.randsac_loss_dense),
            "saim": Setup("saim", lambda: models.build("saim_vit_tiny", **small, query_depth=2), "random",
                          dense.saim_loss_dense),
            "aim": Setup("aim", lambda: models.build("aim_vit_tiny", **small, head_depth=2), "prefix",
                         dense.aim_loss_dense),
        }
    return {
        "randsac": Setup("randsac", lambda: models.build("randsac_vit_base", skip_memory=True), "square:16/4",
                         dense.randsac_loss_dense),
        "saim": Setup("saim", lambda: models.build("saim_vit_base", query_depth=12), "random",
                      dense.saim_loss_dense),
        "aim": Setup("aim", lambda: models.build("aim_vit_base"), "prefix", dense.aim_loss_dense),
    }


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """Dense bf16 peak in TFLOP/s: ``--peak-tflops``, else the trainer's table by device name."""
    if override is not None:
        return override
    flops = peak_flops(device)
    return None if flops is None else flops / 1e12


def probe_backend(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` runs a tiny attention forward + backward here, else why not. Also loads
    the backend once eagerly, which a compiled graph needs (dynamo cannot trace the lazy import)."""
    if backend == "dense":
        return None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32     # what autocast hands attention
    q, k, v = (torch.randn(1, 1, 16, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    seg = torch.arange(16, dtype=torch.int32, device=device)[None]
    try:
        out = ops.segment_attention(q, k, v, seg, seg, inclusive=True, backend=backend)
        out.float().sum().backward()
    except (ops.BackendUnavailable, ImportError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def compile_blocks(model: torch.nn.Module, backend: str) -> None:
    """Compile every transformer block in place, including SAIM's query-stream ``cross`` method
    (``Module.compile`` covers only ``forward``)."""
    for blocks in transformer_blocks(model):
        for blk in blocks:
            blk.compile(backend=backend)
            if hasattr(blk, "cross"):
                blk.cross = torch.compile(blk.cross, backend=backend)


def dynamo_counts() -> dict:
    """Graphs compiled and graph breaks since the last reset (to show that a row really compiled)."""
    from torch._dynamo.utils import counters
    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


@dataclass
class Config:
    model: str
    impl: str          # "dense" or one of OURS
    compile: str       # "none", "block", "model" (ours) or "function" (dense)

    @property
    def name(self) -> str:
        return f"{self.model}/{self.impl}" + ("" if self.compile == "none" else f"+compile:{self.compile}")


class Runner:
    """Builds one configuration's model, optimizer and step, times it, optionally profiles it."""

    def __init__(self, args, setup: Setup, base: torch.nn.Module, device: torch.device):
        self.args, self.setup, self.device = args, setup, device
        self.base = base                                # shared initial weights (CPU)
        h, w = base.img_size
        gen = torch.Generator(device=device).manual_seed(args.seed)
        self.images = torch.randn(args.batch_size, base.in_chans, h, w, device=device, generator=gen)
        # A few different orders, cycled: the kernels see fresh boundaries every step, as in training.
        self.orders = [orders.sample(setup.spec, args.batch_size, base.grid, generator=gen, device=device)
                       for _ in range(4)]
        for order in self.orders:                       # validated once here, so the ops' per-call
            order.validate()                            # checks (a sync each) stay off in the steps
        self.train_flops = statistics.mean(float(base.train_flops(o.to("cpu"))) for o in self.orders)

    def build(self, cfg: Config) -> Callable[[int], torch.Tensor]:
        """-> step(i): one training step on order i (mod the pool) of a fresh copy of the model."""
        model = copy.deepcopy(self.base).to(self.device)
        if cfg.impl == "dense":
            loss_fn = lambda images, order: self.setup.dense_loss(model, images, order)  # noqa: E731
        else:
            models.set_backend(model, cfg.impl)
            model.config.backend = cfg.impl           # also picks the targets / skip-memory backend
            loss_fn = model
        if cfg.compile != "none":
            torch._dynamo.reset()                       # fresh caches: no stale graphs, no recompile limit
            torch._dynamo.utils.counters.clear()        # graph counts per row (dynamo_counts)
            if cfg.compile == "block":
                compile_blocks(model, self.args.compile_backend)
            else:
                loss_fn = torch.compile(loss_fn, backend=self.args.compile_backend)
        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, weight_decay=0.05, fused=fused)
        amp = self.args.dtype == "bf16"

        def step(i: int) -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(self.images, self.orders[i % len(self.orders)])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        return step

    def time(self, step) -> tuple[list[float], float, float]:
        """-> (step times in ms, setup seconds (first step incl. compile + warmup), last loss)."""
        a = self.args
        t0 = time.perf_counter()
        for i in range(a.warmup):
            loss = step(i)
        synchronize(self.device)
        setup_s = time.perf_counter() - t0
        times = []
        for i in range(a.steps):
            synchronize(self.device)
            t = time.perf_counter()
            loss = step(a.warmup + i)
            synchronize(self.device)
            times.append((time.perf_counter() - t) * 1e3)
        return times, setup_s, float(loss)


def run_config(runner: Runner, cfg: Config, peak: float | None) -> tuple[dict, Callable | None]:
    """One row; also returns the step closure (kept for profiling the fastest row)."""
    dev, args = runner.device, runner.args
    row = {"model": cfg.model, "impl": cfg.impl, "compile": cfg.compile, "config": cfg.name,
           "batch": args.batch_size, "status": "ok", "reason": None}
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base_mem = torch.cuda.memory_allocated(dev)
    step = None
    try:
        step = runner.build(cfg)
        times, setup_s, loss = runner.time(step)
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="oom", reason=str(e).splitlines()[0][:300])
    except (ops.BackendUnavailable, ImportError, NotImplementedError) as e:
        row.update(status="unavailable", reason=f"{type(e).__name__}: {str(e)[:300]}")
    except Exception as e:  # noqa: BLE001 — one broken row must not lose the others; it is reported
        row.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
    if row["status"] != "ok":
        return row, None
    if not math.isfinite(loss):
        row.update(status="error", reason=f"non-finite loss {loss}")
    med = statistics.median(times)
    img_s = args.batch_size / (med * 1e-3)
    row.update(step_ms=round(med, 3), img_s=round(img_s, 2), setup_s=round(setup_s, 2), loss=loss,
               step_ms_all=[round(t, 3) for t in times],
               train_tflop_per_step=runner.train_flops / 1e12,
               achieved_tflops=round(runner.train_flops / (med * 1e-3) / 1e12, 2),
               mfu=round(runner.train_flops / (med * 1e-3) / (peak * 1e12), 4) if peak else None)
    if dev.type == "cuda":
        row["peak_mem_gib"] = round((torch.cuda.max_memory_allocated(dev) - base_mem) / 2 ** 30, 2)
    if cfg.compile != "none":
        row.update(dynamo_counts())
    return row, step


# Kernel-name families for the profile summary (a heuristic over names; "other" catches the rest).
FAMILIES = [("attention", ("segattn", "_fwd_kernel", "_bwd_dq", "_bwd_dkdv", "_bwd_delta", "flash", "attention",
                           "softmax", "fmha", "flex")),
            ("gemm", ("gemm", "xmma", "cutlass", "matmul", "sm90_", "sm80_", "cublas", "::mm", "addmm", "bmm")),
            ("norm", ("layer_norm", "layernorm")),
            ("targets/loss", ("patch_", "conv", "mse")),
            ("skip memory", ("skip_",)),
            ("optimizer", ("adam", "multi_tensor", "foreach")),
            ("elementwise/fused", ("elementwise", "vectorized", "triton_", "reduce", "gelu", "copy", "cat",
                                   "gather", "index", "fill"))]


def family(name: str) -> str:
    low = name.lower()
    return next((fam for fam, keys in FAMILIES if any(k in low for k in keys)), "other")


def profile(step, device: torch.device, n: int, top: int) -> dict:
    """Top kernels (CUDA) or ops (CPU) by self time over ``n`` steps, per step."""
    from torch.profiler import ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step(10_000)                                         # a step outside the trace
    synchronize(device)
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(n):
            step(10_001 + i)
        synchronize(device)
    events = prof.key_averages()
    if device.type == "cuda":
        def self_us(e):
            return e.self_device_time_total
        rows = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and self_us(e) > 0]
        sort_by = "self_cuda_time_total"
    else:
        def self_us(e):
            return e.self_cpu_time_total
        rows = [e for e in events if self_us(e) > 0]
        sort_by = "self_cpu_time_total"
    total = sum(self_us(e) for e in rows) or 1.0
    kernels = [{"name": e.key[:160], "calls_per_step": e.count / n, "ms_per_step": round(self_us(e) / n / 1e3, 4),
                "share": round(self_us(e) / total, 4), "family": family(e.key)}
               for e in sorted(rows, key=self_us, reverse=True)]
    fams: dict[str, float] = {}
    for k in kernels:
        fams[k["family"]] = fams.get(k["family"], 0.0) + k["share"]
    print(events.table(sort_by=sort_by, row_limit=top))
    return {"steps": n, "time": "device (CUDA kernels)" if device.type == "cuda" else "cpu (ops)",
            "total_ms_per_step": round(total / n / 1e3, 3), "top": kernels[:top],
            "families": {k: round(v, 4) for k, v in sorted(fams.items(), key=lambda kv: -kv[1])}}


def add_ratios(rows: list[dict]) -> None:
    """x_dense: img/s over the eager dense reference's; x_dense_c: over the compiled one's."""
    for r in rows:
        for key, comp in (("x_dense", "none"), ("x_dense_c", "function")):
            ref = next((d for d in rows if d["model"] == r["model"] and d["impl"] == "dense"
                        and d["compile"] == comp and d["status"] == "ok"), None)
            r[key] = round(r["img_s"] / ref["img_s"], 3) if ref and r["status"] == "ok" else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["randsac", "saim", "aim", "both", "all"], default="both",
                   help="both: randsac and saim; all: also aim")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 128; quick 64; tiny 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; quick 8)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, incl. compilation (default 5; quick 3)")
    p.add_argument("--backends", default=None,
                   help=f"comma list of dense,{','.join(OURS)} (default: {','.join(GPU_BACKENDS)} on CUDA, "
                        f"{','.join(CPU_BACKENDS)} on CPU)")
    p.add_argument("--compile-backends", default=None,
                   help="which of --backends also get a compiled row, in priority order (default: all; "
                        "quick: triton,dense,cuda)")
    p.add_argument("--no-compile", action="store_true", help="eager rows only")
    p.add_argument("--compile-scope", choices=["block", "model"], default="block",
                   help="ours: compile each transformer block (as the trainer does) or the whole loss call")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; aot_eager on the CPU, which tests the tracing "
                        "in seconds)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="autocast dtype (default bf16 on CUDA; fp32, no autocast, on CPU)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 dense peak for MFU (TFLOP/s)")
    p.add_argument("--profile-steps", type=int, default=3, help="steps traced by torch.profiler (0: no profile)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new rows after this many seconds (default: none; quick 150)")
    p.add_argument("--tiny", action="store_true", help="tiny models (CPU in seconds): a smoke test of the script")
    p.add_argument("--quick", action="store_true", help="smaller batch, fewer steps, fewer compiled rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON result (default benchmarks/results/)")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; use --device cpu with --tiny for a smoke run")
    if args.device == "cpu" and not args.tiny:
        p.error("ViT-B training steps on the CPU take minutes each; use --tiny for a CPU smoke run")
    cpu = args.device == "cpu"
    default = lambda full, quick, tiny: tiny if args.tiny else (quick if args.quick else full)  # noqa: E731
    args.batch_size = args.batch_size or default(128, 64, 4)
    args.steps = args.steps or default(20, 8, 2)
    args.warmup = args.warmup if args.warmup is not None else default(5, 3, 1)
    args.budget_s = args.budget_s if args.budget_s is not None else (150.0 if args.quick else math.inf)
    args.dtype = args.dtype or ("fp32" if cpu else "bf16")
    args.compile_backend = args.compile_backend or ("aot_eager" if cpu else "inductor")
    backends = (args.backends.split(",") if args.backends else list(CPU_BACKENDS if cpu else GPU_BACKENDS))
    compiled = (args.compile_backends.split(",") if args.compile_backends
                else ["triton", "dense", "cuda"] if args.quick else backends)
    for name in backends + compiled:
        if name not in ("dense",) + OURS:
            p.error(f"unknown backend {name!r}; choose from dense,{','.join(OURS)}")
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 1:
        p.error(f"--batch-size, --steps and --warmup must be >= 1; got {args.batch_size}, {args.steps}, {args.warmup}")
    args.backends = backends
    args.compiled = [] if args.no_compile else [b for b in compiled if b in backends]   # in priority order
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cpu":
        torch.set_num_threads(1)      # tiny matrices: more threads only spin against each other
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = peak_tflops(device, args.peak_tflops)
    all_setups = setups(args.tiny)
    names = {"both": ["randsac", "saim"], "all": ["randsac", "saim", "aim"]}.get(args.model, [args.model])
    chosen = [all_setups[m] for m in names]
    unavailable = {b: why for b in args.backends if (why := probe_backend(b, device))}
    ops.set_checks(False)     # the orders are validated once (Runner); as in the trainer after step 1

    # Row order: every eager row first (both models), then the compiled ones — under a time budget
    # the side-by-side eager comparison is complete before any compilation starts.
    configs = [Config(s.name, b, "none") for s in chosen for b in args.backends]
    configs += [Config(s.name, b, "function" if b == "dense" else args.compile_scope)
                for b in args.compiled for s in chosen]
    meta = {**provenance(device, "cpu (tiny smoke run, not a performance result)"), "benchmark": "train",
            "tiny": args.tiny, "quick": args.quick, "batch": args.batch_size, "steps": args.steps,
            "warmup": args.warmup, "dtype": args.dtype, "autocast": args.dtype == "bf16",
            "optimizer": "AdamW(lr=1.5e-4, wd=0.05, fused=%s)" % (device.type == "cuda"),
            "tf32": device.type == "cuda", "compile_scope": args.compile_scope, "compile_backend": args.compile_backend,
            "peak_tflops": peak, "peak_source": "--peak-tflops" if args.peak_tflops else "device name",
            "flops": "model.train_flops(order): matmuls only, visible attention pairs only, 3x forward",
            "unavailable": unavailable}
    path = result_path("train", args.out)
    runners, shapes, rows, best = {}, {}, [], None
    start = time.perf_counter()

    def save():
        add_ratios(rows)
        path.write_text(json.dumps({**meta, "shapes": shapes, "rows": rows, "profile": meta.get("profile")},
                                   indent=1))

    for cfg in configs:
        row_base = {"model": cfg.model, "impl": cfg.impl, "compile": cfg.compile, "config": cfg.name,
                    "batch": args.batch_size}
        if cfg.impl in unavailable:
            rows.append({**row_base, "status": "unavailable", "reason": unavailable[cfg.impl]})
            continue
        if time.perf_counter() - start > args.budget_s:
            rows.append({**row_base, "status": "skipped", "reason": f"time budget {args.budget_s:.0f} s spent"})
            continue
        if cfg.model not in runners:
            s = all_setups[cfg.model]
            torch.manual_seed(args.seed)
            base = s.build()
            runners[cfg.model] = Runner(args, s, base, device)
            c = base.config
            shapes[cfg.model] = {"model": type(base).__name__, "img_size": list(base.img_size),
                                 "patch_size": base.patch_size, "grid": list(base.grid), "order": s.spec,
                                 "embed_dim": c.embed_dim, "depth": c.depth, "num_heads": c.num_heads,
                                 "params": sum(p.numel() for p in base.parameters()),
                                 "train_tflop_per_step": runners[cfg.model].train_flops / 1e12,
                                 "config": {k: v for k, v in vars(c).items() if k != "backend"}}
        print(f"[{time.perf_counter() - start:6.1f}s] {cfg.name} ...", file=sys.stderr, flush=True)
        row, step = run_config(runners[cfg.model], cfg, peak)
        rows.append(row)
        ours_ok = row["status"] == "ok" and cfg.impl != "dense"
        if ours_ok and (best is None or row["img_s"] > best[0]["img_s"]):
            best = (row, step)                           # keep the fastest of ours alive for the profile
        del step
        save()

    if best is not None and args.profile_steps > 0:
        row, step = best
        print(f"\nprofile of the fastest of ours: {row['config']}")
        try:
            meta["profile"] = {"config": row["config"], **profile(step, device, args.profile_steps, top=15)}
        except Exception as e:  # noqa: BLE001 — a profiler failure must not lose the timings
            meta["profile"] = {"config": row["config"], "error": f"{type(e).__name__}: {e}"}
        prof = meta["profile"]
        if "families" in prof:
            print("time by kernel family: " + ", ".join(f"{k} {v:.0%}" for k, v in prof["families"].items()))
    best = None
    ops.set_checks(True)
    save()

    print(f"\n# train  {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  cuda {meta['cuda']}  "
          f"commit {(meta['git_commit'] or '?')[:10]}  batch {args.batch_size}  {args.dtype}  "
          f"peak {peak or '?'} TFLOP/s  -> {path}")
    for cfg_row in rows:
        if cfg_row["status"] == "ok":
            cfg_row["mfu_%"] = None if cfg_row["mfu"] is None else round(100 * cfg_row["mfu"], 1)
    print(format_table(rows, ["model", "impl", "compile", "status", "img_s", "step_ms", "mfu_%", "peak_mem_gib",
                              "x_dense", "x_dense_c"]))
    for r in rows:
        if r["status"] != "ok":
            print(f"  {r['config']}: {r['status']}: {r['reason']}")
    result = json.loads(path.read_text())
    if any(r["status"] == "error" for r in rows):
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
