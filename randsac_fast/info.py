"""``python -m randsac_fast.info [--json] [--quick] [--out FILE]``: what this machine runs, and how well.

Like ``python -m xformers.info`` or ``torch.utils.collect_env``: versions (python, torch, CUDA,
cuDNN, triton, driver, GPUs), which backends of each op import / are built, the self-check verdict
of every fast backend per dtype (the same check ``auto`` runs before it trusts a backend, see
:mod:`randsac_fast.ops.selfcheck`), and on a GPU a short timing of every backend at ViT-B shapes
with the backend ``auto`` chooses there. Without a GPU the Triton kernels are checked under the
Triton interpreter in fp32 and fp16, and the report lists the checks that need a GPU.
``--json`` prints one JSON object with every field (the same keys on every machine).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

if not torch.cuda.is_available():          # before any Triton kernel is defined (checks on the CPU)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import __version__  # noqa: E402
from .ops import _dispatch, autotune, cases, selfcheck  # noqa: E402

ENV_VARS = ("RANDSAC_FAST_SELFCHECK", "RANDSAC_FAST_AUTOTUNE", "RANDSAC_FAST_AUTOTUNE_CACHE", "RANDSAC_FAST_JIT",
            "RANDSAC_FAST_CHECKS", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
FIELDS = ("randsac_fast", "git_commit", "python", "platform", "torch", "cuda", "cudnn", "triton", "driver",
          "gpus", "device", "env", "backends", "selfcheck", "needs_gpu", "timing", "auto", "seconds")

# The structures checked per op: ViT-B as the models call them (attention on head views of the
# fused qkv projection, head dim 64; SAIM's blurred and RandSAC's plain targets; 12 -> 8 skip memory).
STRUCTURES = {
    "segment_attention": [(64, True, "strided"), (64, False, "strided")],
    "patch_targets": [(3, 16, 0, True, True), (3, 16, 9, True, True)],
    "patch_loss": [(3, 16, 0, True, "mse", True, "float32")],
    "skip_memory": [(12, 8, 768, "float32")],
}
# Under the interpreter (one program at a time, numpy) a smaller skip memory keeps info to ~1 minute.
CPU_STRUCTURES = STRUCTURES | {"skip_memory": [(5, 3, 96, "float32")]}
# ViT-B shapes for the timing: RandSAC-192 (12x12 tokens, square:16/4), SAIM-224 (197 with cls).
TIMING = {
    "segment_attention": [("randsac_vitb_144", (64, True, "strided"), (128, 12, 144, 144)),
                          ("saim_vitb_197", (64, True, "strided"), (128, 12, 197, 197))],
    "patch_loss": [("randsac_vitb_192px", (3, 16, 0, True, "mse", True, "float32"), (128, 192, 192, 144))],
    "skip_memory": [("randsac_vitb_12to8", (12, 8, 768, "float32"), (128, 144))],
}


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": prop.name, "capability": f"{prop.major}.{prop.minor}",
                         "memory_gib": round(prop.total_memory / 2**30, 1)})
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return {
        "randsac_fast": __version__,
        "git_commit": _run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"]),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": triton_version, "driver": driver.splitlines()[0] if driver else None, "gpus": gpus,
    }


def backends() -> dict:
    """op -> backend -> {"available": bool, "detail": why not}: whether each implementation loads here."""
    out = {}
    for op, problems in _dispatch.registered().items():
        out[op] = {}
        for name, loader in problems.table.items():
            try:
                loader()
                out[op][name] = {"available": True, "detail": ""}
            except _dispatch.BackendUnavailable as e:
                out[op][name] = {"available": False, "detail": str(e)[:300]}
    return out


def _dtypes(device: torch.device, quick: bool = False) -> list[torch.dtype]:
    # The interpreter holds bf16 as raw integers in tl.dot: bf16 is checked on a GPU only.
    if quick:   # the training dtype on a GPU; the first dtype the interpreter handles on the CPU
        return [torch.bfloat16] if device.type == "cuda" else [torch.float32]
    return [torch.float32, torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.float32, torch.float16]


def self_checks(device: torch.device, available: dict, quick: bool = False, progress=None) -> list[dict]:
    """Every fast backend of every op, per dtype and structure, through the dispatcher's own check
    (``quick``: bf16 on a GPU, and the first structure of each op only; ``progress(rows)`` after each)."""
    structures = STRUCTURES if device.type == "cuda" else CPU_STRUCTURES
    rows = []
    for op, problems in _dispatch.registered().items():
        for name in problems.table:
            if name in problems.trusted or name == problems.reference or not available[op][name]["available"]:
                continue
            if name in ("flex", "xformers"):     # peers for benchmarks, not auto candidates
                continue
            for dtype in _dtypes(device, quick):
                for structure in structures.get(op, [])[:1 if quick else None]:
                    verdict = _dispatch.verify(op, name, device, dtype, structure)
                    rows.append(verdict.as_dict() | {"dtype": str(dtype).removeprefix("torch."),
                                                     "structure": [str(s) for s in structure]})
                    if progress is not None:
                        progress(rows)
    return rows


def needs_gpu(device: torch.device, available: dict) -> list[str]:
    if device.type == "cuda":
        return []
    return ["bf16 self-checks of the Triton kernels (the interpreter mishandles bf16 tl.dot)",
            "self-checks of the cuda backend (the compiled extension runs on CUDA tensors only)",
            "compiled (non-interpreted) Triton kernels, with their GPU tile sizes and autotuning",
            "timings at ViT-B shapes and the backend auto chooses by measuring"]


def timings(device: torch.device) -> tuple[list[dict], list[dict]]:
    """On a GPU: each backend's fwd+bwd median ms at the ViT-B shapes, and auto's choice there."""
    if device.type != "cuda":
        return [], []
    rows, auto = [], []
    dtype = torch.bfloat16
    for op, shapes in TIMING.items():
        problems = _dispatch.registered()[op]
        for label, structure, shape in shapes:
            case = problems.timing(device, dtype, structure, shape)
            ms = {}
            for name, loader in problems.table.items():
                if op == "segment_attention" and name in ("reference", "flex", "xformers"):
                    continue                       # dense masks / compiled peers: see bench_attention.py
                try:
                    ms[name] = autotune.time_ms(autotune.case_step(loader(), case), device, warmup=3, reps=10)
                except Exception as e:  # noqa: BLE001 — reported, not fatal: this is a survey
                    ms[name] = None
                    rows.append({"op": op, "shape": label, "backend": name, "error": f"{type(e).__name__}: {e}"[:300]})
            rows.append({"op": op, "shape": label, "dtype": "bfloat16", "dims": list(shape), "ms": ms})
            try:
                chosen = _dispatch.choose(op, device, dtype, structure, tuple(shape), problems.order(device))
            except Exception as e:  # noqa: BLE001
                chosen = f"error: {type(e).__name__}: {e}"[:300]
            auto.append({"op": op, "shape": label, "chosen": chosen})
    return rows, auto


def collect(quick: bool = False, out: str | None = None) -> dict:
    """Every field of the report (see FIELDS); ``quick``: fewer self-checks (a rehearsal). ``out``: the
    JSON file, rewritten after every self-check verdict (a killed run leaves what it checked)."""
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = versions()
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    info["env"] = {k: os.environ.get(k) for k in ENV_VARS}
    info["backends"] = backends()
    saved_mode = selfcheck._mode_override
    selfcheck.set_mode("warn")             # report mismatches; never raise, never skip, here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            info["selfcheck"] = self_checks(device, info["backends"], quick,
                                            progress=(lambda rows: _write(out, info | {"selfcheck": rows}))
                                            if out else None)
            if out:
                _write(out, info)
            info["timing"], info["auto"] = timings(device)
    finally:
        selfcheck.set_mode(saved_mode)
    info["needs_gpu"] = needs_gpu(device, info["backends"])
    info["seconds"] = round(time.perf_counter() - t0, 2)
    assert set(info) == set(FIELDS), sorted(set(info) ^ set(FIELDS))
    return info


def _write(path: str, info: dict) -> None:
    """Write the (possibly partial) report atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(info, indent=1, default=str))
    os.replace(tmp, path)
def _columns(rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Rows of cells as aligned text: each column as wide as its widest cell, two spaces between
    columns, so no two cells ever run together; the last column is not padded."""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max((len(r) for r in rows), default=0))]
    return [indent + "  ".join(c.ljust(widths[i]) if i < len(r) - 1 else c for i, c in enumerate(r)).rstrip()
            for r in rows]


def report(info: dict) -> str:
    """The human-readable report. Nothing is cut: a long detail (an error, the fix) gets its own
    indented line, whole."""
    lines = [f"randsac_fast {info['randsac_fast']} (commit {(info['git_commit'] or '?')[:10]})",
             f"python {info['python']}  {info['platform']}",
             f"torch {info['torch']}  CUDA {info['cuda']}  cuDNN {info['cudnn']}  triton {info['triton']}  "
             f"driver {info['driver']}"]
    for g in info["gpus"]:
        lines.append(f"GPU {g['index']}: {g['name']} (sm_{g['capability'].replace('.', '')}, {g['memory_gib']} GiB)")
    lines.append(f"device checked: {info['device']}")
    lines.append("env: " + ", ".join(f"{k}={v}" for k, v in info["env"].items() if v is not None))
    lines.append("\nbackends (importable / built):")
    for op, table in info["backends"].items():
        cells = [f"{n}{'' if b['available'] else ' (no)'}" for n, b in table.items()]
        lines += _columns([[op, ", ".join(cells)]])
        for n, b in table.items():
            if not b["available"]:
                lines.append(f"      {n}: {b['detail']}")
    lines.append("\nself-check (fast backend vs plain PyTorch in its dtype vs float64, forward + backward):")
    rows, details = [], []
    for r in info["selfcheck"]:
        worst = max(r["errors"].items(), key=lambda kv: kv[1]["fast"] / max(kv[1]["bound"], 1e-30), default=None)
        detail = (f"worst {worst[0]} {worst[1]['fast']:.1e} <= {worst[1]['bound']:.1e}" if r["status"] == "ok" and worst
                  else r["detail"] or "; ".join(f"{n} {e['fast']:.1e} > {e['bound']:.1e}"
                                                for n, e in r["errors"].items() if not e["ok"]))
        rows.append([r["op"], r["backend"], r["dtype"], ",".join(r["structure"]), r["status"].upper(),
                     f"{r['seconds']:.2f} s"])
        details.append(detail)
    for line, detail in zip(_columns(rows), details):
        lines.append(line)
        if detail:
            lines.append(f"      {detail}")
    if info["timing"]:
        lines.append("\ntiming, bf16, fwd+bwd median ms (auto's choice marked *):")
        chosen = {(a["op"], a["shape"]): a["chosen"] for a in info["auto"]}
        rows = []
        for r in info["timing"]:
            if "ms" not in r:
                rows.append([r["op"], r["shape"], f"{r['backend']}: {r['error']}"])
                continue
            rows.append([r["op"], r["shape"], *(f"{n}{'*' if chosen.get((r['op'], r['shape'])) == n else ''} "
                                                f"{'-' if t is None else f'{t:.3f}'}" for n, t in r["ms"].items())])
        lines += _columns(rows)
    if info["needs_gpu"]:
        lines.append("\nneeds a GPU (not checked here):")
        lines += [f"  - {n}" for n in info["needs_gpu"]]
    lines.append(f"\n({info['seconds']} s)")
    return "\n".join(lines)


def _writable_out(path: str, force: bool) -> bool:
    """--out names a file info may write (see randsac_fast.outputs); else one error line and False."""
    from . import config as config_mod
    from .outputs import claim_file
    try:
        config_mod.check_args(argparse.Namespace(out=path), {"out": config_mod.writable_file(True)})
        claim_file(path, "info", force=force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    return True


def main(argv=None) -> int:
    from . import started
    started()                # Ctrl-C is this command's to handle from here
    p = argparse.ArgumentParser(prog="python -m randsac_fast.info", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object with every field")
    p.add_argument("--quick", action="store_true", help="bf16 on a GPU (fp32 on the CPU), one structure per op")
    p.add_argument("--out", default=None, help="also write the JSON to this file (the report still prints)")
    p.add_argument("--force", action="store_true", help="replace an --out file another command (or you) wrote")
    args = p.parse_args(argv)
    if args.out and not _writable_out(args.out, args.force):   # checked before the (slow) checks run
        return 1
    info = collect(args.quick, args.out)      # rewrites --out after each check: a killed run keeps them
    if args.out:
        from .outputs import OutputError, atomic_text
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            atomic_text(args.out, json.dumps(info, indent=1, default=str), "info")
        except OSError as e:
            from .outputs import disk_message
            print(f"error: {e if isinstance(e, OutputError) else disk_message(e, args.out)}", file=sys.stderr)
            return 1
    print(json.dumps(info, indent=1) if args.json else report(info))
    failed = [r for r in info["selfcheck"] if r["status"] in ("mismatch", "error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
