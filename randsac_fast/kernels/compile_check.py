"""Ahead-of-time compile check of every Triton kernel of the package for CUDA sm_90 (H100), no GPU needed.

    python -m randsac_fast.kernels.compile_check [--full] [--jobs N] [--only SUBSTRING]

Each variant is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``
down to a cubin (ptxas included), with the argument specialisation a real launch would get
(16-byte aligned pointers and multiples of 16 marked divisible, integers equal to 1 folded into
constants). One line is printed per variant: kernel, dtype, shapes / block sizes, num_warps,
num_stages, registers, spills (bytes of spill stores / loads, from the ptxas log), shared memory.
The exit status is 1 if any variant failed to compile.

Default variant set (a representative subset that keeps the run to a few minutes on two cores):

* attention forward / bwd dK-dV / bwd dQ: the pinned tile (what a launch uses by default, see
  ``triton_attention.PINNED``) in bf16, fp16 and fp32 (ieee dots) at head dims 32, 64 and 128;
* attention bwd delta (one fixed tile): the same dtypes and head dims;
* skip memory forward / backward: fp32 and bf16 hidden states (fp32 weight), Lenc=12, Ldec=8;
* patch targets / patch loss forward / backward: fp32 and bf16 images (and predictions),
  P=16, C=3, blur k=9 and k=0, norm-pix on.

``--full`` compiles, for the attention kernels, every tile a ``RANDSAC_FAST_TILES=sweep`` run may
time (the kernels' candidates after their register prune) in bf16, fp16 and fp32 at 64 and 128.

The module never needs CUDA. It refuses the Triton interpreter: with TRITON_INTERPRET set it is
removed from this process's environment before Triton and the kernel modules are imported.
Compilation uses a fresh temporary Triton cache so every variant really goes through ptxas.
"""
from __future__ import annotations

import os
import sys

_KERNEL_MODULES = ("randsac_fast.kernels.triton_attention", "randsac_fast.kernels.triton_skip",
                   "randsac_fast.kernels.triton_targets")


def _prepare_environment() -> None:
    """Must run before triton or any kernel module is imported (triton.jit picks the interpreter
    when a kernel is defined)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        loaded = [m for m in _KERNEL_MODULES if m in sys.modules]
        if loaded:
            sys.exit(f"compile_check: TRITON_INTERPRET is set and {', '.join(loaded)} was already imported "
                     f"under the interpreter; run `python -m randsac_fast.kernels.compile_check` in a fresh "
                     f"process without TRITON_INTERPRET")
        print("compile_check: ignoring TRITON_INTERPRET (compiling for sm_90, not interpreting)", file=sys.stderr)
        os.environ.pop("TRITON_INTERPRET")
    # Triton >= 3.9 warns when this is unset; 1 is the default of the versions we run (3.6 ... 3.9).
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


if __name__ == "__main__":
    _prepare_environment()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

ARCH = 90            # H100
WARP_SIZE = 32
H100_MAX_SMEM = 232448   # bytes of shared memory one block may use (227 KiB)

# Representative problem: ViT-B/16 at 224 (196 patches, 12 heads), RandSAC skip memory (12 -> 8).
_B, _H, _NQ, _NK = 64, 12, 196, 197
_IMG, _P, _C = 224, 16, 3
_LENC, _LDEC = 12, 8


@dataclasses.dataclass
class Variant:
    module: str
    kernel: str
    dtype: str
    desc: str
    args: dict            # runtime (non-constexpr) arguments: name -> representative value
    constexprs: dict
    num_warps: int
    num_stages: int


class Ptr:
    """A pointer argument of the given Triton element type (always 16-byte aligned at run time)."""

    def __init__(self, ty: str):
        self.ty = ty


def _specialise(value):
    """(signature type, divisible by 16, folded constant) as Triton's launcher would specialise."""
    if isinstance(value, Ptr):
        return "*" + value.ty, True, False
    if isinstance(value, bool):
        return "u1", False, False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False, True
        ty = "i32" if -2**31 <= value < 2**31 else "i64"
        return ty, value % 16 == 0, False
    if isinstance(value, float):
        return "fp32", False, False
    raise TypeError(f"no specialisation rule for {value!r}")


# ------------------------------------------------------------------------------------------------
# Variant lists
# ------------------------------------------------------------------------------------------------
def _unwrap(kernel):
    """The JITFunction under triton.autotune / heuristics wrappers (which also carry arg_names)."""
    from triton.runtime.jit import JITFunction
    while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


_TILED = {"_fwd_kernel": "fwd", "_bwd_dkdv_kernel": "dkdv", "_bwd_dq_kernel": "dq"}


def _attention_configs(mod, kernel_name, d, dtype, which):
    """(BLOCK_M, BLOCK_N, warps, stages) to compile: the pinned tile ("pinned") or every tile a
    sweep may time after the kernel's own prune ("all")."""
    kernel = _TILED[kernel_name]
    if which == "pinned":
        tiles = [mod.pinned(kernel, d, dtype)]
    else:
        tiles = mod.candidates(kernel, d, dtype)
    return [(t.block_m, t.block_n, t.num_warps, t.num_stages) for t in tiles]


def _attention_variants(full: bool) -> list[Variant]:
    mod = importlib.import_module("randsac_fast.kernels.triton_attention")
    name = mod.__name__
    out = []

    def strides(d, n):
        return _H * n * d, n * d, d          # contiguous [B, H, N, D]

    # (dtype, head dim, which tiles): "pinned" = the tile launched by default, "all" = every sweep candidate.
    plan = [(dt, d, "pinned") for dt in ("bf16", "fp16", "fp32") for d in (32, 64, 128)]
    if full:
        plan = [(dt, d, "all") for dt in ("bf16", "fp16", "fp32") for d in (64, 128)]
    for dt, d, which in plan:
        block_d = max(16, 1 << (d - 1).bit_length())
        precision = "ieee" if dt == "fp32" else "tf32"
        sq, sk = strides(d, _NQ), strides(d, _NK)
        t = Ptr(dt)
        common = dict(HEAD_DIM=d, BLOCK_D=block_d, DOT_PRECISION=precision)
        kernels = {
            "_fwd_kernel": dict(Q=t, K=t, V=t, O=t, LSE=Ptr("fp32"), KV_LEN=Ptr("i32"),
                                **_named("stride_q", sq), **_named("stride_k", sk), **_named("stride_v", sk),
                                **_named("stride_o", sq), H=_H, N_Q=_NQ, N_K=_NK, scale_log2=0.18),
            "_bwd_dkdv_kernel": dict(Q=t, K=t, V=t, DO=t, LSE=Ptr("fp32"), DELTA=Ptr("fp32"), KV_LEN=Ptr("i32"),
                                     Q_START=Ptr("i32"), DK=t, DV=t,
                                     **_named("stride_q", sq), **_named("stride_k", sk), **_named("stride_v", sk),
                                     **_named("stride_do", sq), **_named("stride_dk", sk), **_named("stride_dv", sk),
                                     H=_H, N_Q=_NQ, N_K=_NK, scale=0.125, scale_log2=0.18),
            "_bwd_dq_kernel": dict(Q=t, K=t, V=t, DO=t, LSE=Ptr("fp32"), DELTA=Ptr("fp32"), KV_LEN=Ptr("i32"), DQ=t,
                                   **_named("stride_q", sq), **_named("stride_k", sk), **_named("stride_v", sk),
                                   **_named("stride_do", sq), **_named("stride_dq", sq),
                                   H=_H, N_Q=_NQ, N_K=_NK, scale=0.125, scale_log2=0.18),
        }
        for kname, args in kernels.items():
            for bm, bn, w, s in _attention_configs(mod, kname, d, dt, which):
                out.append(Variant(name, kname, dt, f"D={d} BM={bm} BN={bn}", args,
                                   dict(common, BLOCK_M=bm, BLOCK_N=bn), w, s))
        # bwd delta: not autotuned; the launcher uses BLOCK_M=64 and Triton's default warps / stages.
        out.append(Variant(name, "_bwd_delta_kernel", dt, f"D={d} BM=64",
                           dict(O=t, DO=t, DELTA=Ptr("fp32"), **_named("stride_o", sq), **_named("stride_do", sq),
                                H=_H, N_Q=_NQ),
                           dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=64), 4, 3))
    return out


def _named(prefix, values):
    return {f"{prefix}{suffix}": v for suffix, v in zip("bhn", values)}


def _skip_variants() -> list[Variant]:
    mod = importlib.import_module("randsac_fast.kernels.triton_skip")
    m = _B * _NQ * 768
    n_blocks = -(-m // mod.BLOCK)
    ld = 1 << (_LDEC - 1).bit_length()
    lk = 1 << (_LENC - 1).bit_length()
    out = []
    for dt in ("fp32", "bf16"):
        t, w = Ptr(dt), Ptr("fp32")
        out.append(Variant(mod.__name__, "skip_fwd_kernel", dt, f"Lenc={_LENC} LD={ld} BLOCK={mod.BLOCK}",
                           dict(h_ptrs=(t,) * _LENC, w_ptr=w, z_ptr=t, M=m, LDEC=_LDEC),
                           dict(LENC=_LENC, LD=ld, BLOCK=mod.BLOCK), mod.NUM_WARPS, 3))
        out.append(Variant(mod.__name__, "skip_bwd_kernel", dt, f"Lenc={_LENC} LD={ld} LK={lk} BLOCK={mod.BLOCK}",
                           dict(dz_ptr=t, h_ptrs=(t,) * _LENC, w_ptr=w, dh_ptrs=(t,) * _LENC,
                                dw_part_ptr=Ptr("fp32"), M=m, LDEC=_LDEC,
                                n_blocks=n_blocks),
                           dict(LENC=_LENC, LD=ld, LK=lk, BLOCK=mod.BLOCK), mod.NUM_WARPS, 3))
    return out


def _targets_variants() -> list[Variant]:
    mod = importlib.import_module("randsac_fast.kernels.triton_targets")
    grid_w = _IMG // _P
    n_rows = grid_w * grid_w
    # contiguous [B, C, H, W] images: s_w == 1 is folded into a constant, as at run time
    geometry = dict(n_rows=n_rows, C=_C, H=_IMG, W=_IMG, grid_w=grid_w,
                    s_b=_C * _IMG * _IMG, s_c=_IMG * _IMG, s_h=_IMG, s_w=1, eps=1e-6)
    out = []
    for dt in ("fp32", "bf16"):
        img = Ptr(dt)
        for k in (9, 0):
            bp, bc, br = mod.block_sizes(_P, _C, k)
            ce = dict(P=_P, K=k, NORM=True, BP=bp, BC=bc, BR=br)
            desc = f"P={_P} C={_C} k={k} BP={bp} BC={bc} BR={br}"
            for has_perm in (True, False):
                out.append(Variant(mod.__name__, "patch_targets_kernel", dt, desc + f" perm={int(has_perm)}",
                                   dict(img_ptr=img, perm_ptr=Ptr("i64"), taps_ptr=Ptr("fp32"), out_ptr=Ptr("fp32"),
                                        **geometry),
                                   dict(ce, HAS_PERM=has_perm), 4, 3))
            pred = Ptr(dt)
            out.append(Variant(mod.__name__, "patch_loss_fwd_kernel", dt, desc + " mse valid",
                               dict(pred_ptr=pred, img_ptr=img, perm_ptr=Ptr("i64"), valid_ptr=Ptr("u8"),
                                    taps_ptr=Ptr("fp32"), row_err_ptr=Ptr("fp32"), **geometry),
                               dict(ce, L1=False, HAS_VALID=True), 4, 3))
            out.append(Variant(mod.__name__, "patch_loss_bwd_kernel", dt, desc + " mse valid",
                               dict(pred_ptr=pred, img_ptr=img, perm_ptr=Ptr("i64"), valid_ptr=Ptr("u8"),
                                    taps_ptr=Ptr("fp32"), coef_ptr=Ptr("fp32"), dpred_ptr=pred, **geometry),
                               dict(ce, L1=False, HAS_VALID=True), 4, 3))
    return out


# ------------------------------------------------------------------------------------------------
# Compilation (runs in worker processes)
# ------------------------------------------------------------------------------------------------
_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _resources_from_cubin(cubin: bytes):
    """Registers via the cuobjdump bundled with Triton, if any (no spill counts there)."""
    try:
        import triton
        tool = triton.knobs.nvidia.cuobjdump.path
    except Exception:
        tool = shutil.which("cuobjdump")
    if not tool:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            res = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=60)
        except Exception:
            return None
    m = re.search(r"REG:(\d+)", res.stdout)
    return int(m.group(1)) if m else None


def _unspecialised(fn) -> set[str]:
    """Names of the arguments a kernel marks ``do_not_specialize`` (given by name or index)."""
    names = set()
    for x in getattr(fn, "do_not_specialize", None) or ():
        names.add(fn.arg_names[x] if isinstance(x, int) else x)
    return names


def compile_variant(v: Variant) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    result = dict(regs=None, spills=None, shared=None, seconds=0.0, error=None)
    try:
        fn = _unwrap(getattr(importlib.import_module(v.module), v.kernel))
        signature, constexprs, attrs = {}, dict(v.constexprs), {}
        missing = [a for a in fn.arg_names if a not in v.args and a not in v.constexprs]
        unknown = [a for a in list(v.args) + list(v.constexprs) if a not in fn.arg_names]
        if missing or unknown:
            raise TypeError(f"argument mismatch: missing {missing}, unknown {unknown}")
        for i, a in enumerate(fn.arg_names):
            if a in v.constexprs:
                signature[a] = "constexpr"
                continue
            if isinstance(v.args[a], tuple):          # a tuple argument (e.g. the skip memory's state
                specs = [_specialise(x) for x in v.args[a]]   # pointers): one type per element, by path
                if any(folded for _, _, folded in specs):
                    raise TypeError(f"{a}: no folded constants inside a tuple argument")
                signature[a] = tuple(ty for ty, _, _ in specs)
                for j, (_, divisible, _) in enumerate(specs):
                    if divisible:
                        attrs[(i, j)] = [["tt.divisibility", 16]]
                continue
            ty, divisible, folded = _specialise(v.args[a])
            if a in _unspecialised(fn):               # do_not_specialize: neither folded nor marked divisible
                ty, divisible, folded = ("i32" if ty == "constexpr" else ty), False, False
            signature[a] = ty
            if folded:
                constexprs[a] = v.args[a]
            elif divisible:
                attrs[(i, )] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        log = io.StringIO()
        knobs = getattr(triton, "knobs", None)
        if knobs is not None:
            knobs.nvidia.dump_ptxas_log = True   # ptxas -v output is printed to stdout: captured below
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", ARCH, WARP_SIZE),
                                      options=dict(num_warps=v.num_warps, num_stages=v.num_stages))
        meta = compiled.metadata
        result["shared"] = getattr(meta, "shared", None)
        regs = getattr(meta, "n_regs", None) or getattr(compiled, "n_regs", None)
        spills = getattr(meta, "n_spills", None)
        text = log.getvalue()
        if regs is None and (m := _REGS.search(text)):
            regs = int(m.group(1))
        if spills is None and (m := _SPILLS.search(text)):
            spills = (int(m.group(1)), int(m.group(2)))
        if regs is None and "cubin" in compiled.asm:
            regs = _resources_from_cubin(compiled.asm["cubin"])
        result["regs"], result["spills"] = regs, spills
    except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
        msg = f"{type(e).__name__}: {e}".strip()
        lines = msg.splitlines()
        if len(lines) > 40:
            lines = lines[:20] + ["..."] + lines[-20:]
        where = "" if len(lines) > 1 else "\n" + "".join(traceback.format_exc().splitlines(True)[-3:])
        result["error"] = "\n".join(lines) + where
    result["seconds"] = time.perf_counter() - t0
    return result


def _worker_init(cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    for m in _KERNEL_MODULES:
        importlib.import_module(m)


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def _fmt(v: Variant, r: dict) -> str:
    regs = "n/a" if r["regs"] is None else str(r["regs"])
    if r["spills"] is None:
        spills = "n/a"
    elif isinstance(r["spills"], tuple):
        spills = "0" if r["spills"] == (0, 0) else f"{r['spills'][0]}B st/{r['spills'][1]}B ld"
    else:
        spills = str(r["spills"])
    smem = "n/a" if r["shared"] is None else str(r["shared"])
    status = "ok"
    if r["error"]:
        status = "FAILED"
    elif r["shared"] is not None and r["shared"] > H100_MAX_SMEM:
        status = "ok (smem > H100 limit: a sweep drops it at run time)"
    return (f"{v.kernel:<22} {v.dtype:<5} {v.desc:<40} warps={v.num_warps:<2} stages={v.num_stages} "
            f"regs={regs:<4} spills={spills:<16} smem={smem:<7} {r['seconds']:5.1f}s  {status}")


def main(argv=None) -> int:
    _prepare_environment()
    parser = argparse.ArgumentParser(prog="python -m randsac_fast.kernels.compile_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=False, help="every sweep candidate tile of the attention kernels")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--only", default="", help="compile only kernels whose name contains this")
    parser.add_argument("--list", action=argparse.BooleanOptionalAction, default=False, help="list the variants without compiling")
    args = parser.parse_args(argv)

    cache_dir = tempfile.mkdtemp(prefix="randsac_compile_check_")
    os.environ["TRITON_CACHE_DIR"] = cache_dir   # fresh cache: every variant goes through ptxas
    try:
        import triton
        variants = _attention_variants(args.full) + _skip_variants() + _targets_variants()
        variants = [v for v in variants if args.only in v.kernel]
        if not variants:
            print(f"compile_check: no kernel name contains {args.only!r}", file=sys.stderr)
            return 2
        print(f"triton {triton.__version__}: {len(variants)} variants for cuda sm_{ARCH} "
              f"({'full' if args.full else 'default subset'}), {args.jobs} job(s)", flush=True)
        if args.list:
            for v in variants:
                print(f"{v.kernel:<22} {v.dtype:<5} {v.desc:<40} warps={v.num_warps} stages={v.num_stages}")
            return 0
        t0 = time.perf_counter()
        failures = []
        jobs = max(1, min(args.jobs, len(variants)))
        if jobs > 1:
            import concurrent.futures
            import multiprocessing
            ctx = multiprocessing.get_context("spawn")   # never fork a process holding MLIR contexts
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                                        initargs=(cache_dir, )) as pool:
                results = pool.map(compile_variant, variants)
                for v, r in zip(variants, results):
                    print(_fmt(v, r), flush=True)
                    if r["error"]:
                        failures.append((v, r))
        else:
            for v in variants:
                r = compile_variant(v)
                print(_fmt(v, r), flush=True)
                if r["error"]:
                    failures.append((v, r))
        elapsed = time.perf_counter() - t0
        for v, r in failures:
            print(f"\n--- FAILED: {v.kernel} {v.dtype} {v.desc} warps={v.num_warps} stages={v.num_stages}\n"
                  f"{r['error']}", file=sys.stderr)
        print(f"{len(variants) - len(failures)}/{len(variants)} variants compiled in {elapsed:.0f}s"
              + (f"; {len(failures)} FAILED" if failures else ""), flush=True)
        return 1 if failures else 0
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
