"""Helpers shared by the benchmark scripts: device pick, timing, copy bandwidth, provenance, report.

Every benchmark prints a table and writes one JSON record whose metadata says where the numbers
come from (device, library versions, git commit, date): numbers without provenance are not results.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# --dtype choices of the kernel benchmarks (bench_targets, bench_skip_memory)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pick_device() -> torch.device:
    """CUDA when present; the CPU only for an interpreter smoke run of a Triton benchmark."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if interpreting():
        return torch.device("cpu")
    raise SystemExit("this benchmark needs a CUDA device (or TRITON_INTERPRET=1 with --quick for a CPU "
                     "smoke run of the script)")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on a GPU): the package's own timer, the
    one ``auto`` backend selection measures with."""
    from randsac_fast.ops.autotune import time_ms
    return time_ms(fn, device, warmup=warmup, reps=reps)


def copy_bandwidth(device: torch.device, reps: int, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a plain device copy (read + write): the ceiling for memory-bound kernels."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps)
    return 2 * nbytes / (ms * 1e-3)


def provenance(device: torch.device, cpu_note: str = "cpu (smoke run, not a performance result)") -> dict:
    """Device name, library versions, git commit (and whether the tree was dirty), UTC date."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10,
                                  cwd=Path(__file__).resolve().parent).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_note,
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Rows as left-aligned text columns (missing cells print as '-')."""
    cells = [[("-" if r.get(c) is None else str(r[c])) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def result_path(name: str, out: str | Path) -> Path:
    """``out/<name>_<UTC stamp>.json`` (the folder is created)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return folder / f"{name}_{stamp}.json"


def write_json(path: Path, obj: dict) -> None:
    """Write atomically (a reader, or a killed run, never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def report(name: str, rows: list[dict], columns: list[str], meta: dict, out: str | Path,
           path: Path | None = None) -> Path:
    """Print rows as a table and write {meta, rows} as JSON under ``out`` (or to ``path``, the file
    the run has been writing its partial rows to)."""
    print(format_table(rows, columns))
    path = path or result_path(name, out)
    write_json(path, {**meta, "rows": rows})
    print(f"wrote {path}")
    return path


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark shares: --out, --quick, --reps."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON results (default: benchmarks/results/)")
    p.add_argument("--quick", action="store_true", help="small batch, few repetitions")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20, quick 5)")
    return p
