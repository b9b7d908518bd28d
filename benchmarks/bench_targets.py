"""Benchmark: fused Triton targets and patch loss vs the PyTorch path (conv2d + patchify + norm).

Cases, at ViT-B shapes (B=256, P=16, C=3, images 224x224 and 192x192, perm = a random
permutation of all tokens):
  targets    blur (SAIM's k=9, sigma=1, or none) -> patchify -> norm-pix -> gather
  loss       the MSE patch loss, forward + backward w.r.t. pred (PyTorch: targets, then the loss)

Reports the median time and the achieved fraction of HBM bandwidth: the minimum bytes each case
must move (read images and pred, write targets / dpred) over its time, divided by the bandwidth
of a plain device-to-device copy measured in the same run. Prints a table and writes JSON
(device, versions, git commit, date, shapes, timings) under ``--out``.

    python benchmarks/bench_targets.py [--quick] [--dtype bf16] [--out benchmarks/results/]

Needs a CUDA device. Without one, ``TRITON_INTERPRET=1 python benchmarks/bench_targets.py --quick``
runs tiny shapes on the CPU as a smoke test of the script (its numbers are not performance).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- helpers shared by the benchmarks (bench_skip_memory imports them) -----------------------
def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return torch.device("cpu")
    raise SystemExit("this benchmark needs a CUDA device (or TRITON_INTERPRET=1 with --quick for a CPU "
                     "smoke run of the script)")


def median_ms(fn, device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, reps: int, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a plain device copy (read + write): the ceiling for memory-bound kernels."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps)
    return 2 * nbytes / (ms * 1e-3)


def provenance(device: torch.device) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).resolve().parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                  else "cpu (Triton interpreter: smoke run, not a performance result)",
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def report(name: str, rows: list[dict], columns: list[str], meta: dict, out: str) -> Path:
    """Print rows as a table and write {meta, rows} as JSON under ``out``."""
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)))
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = path / f"{name}_{stamp}.json"
    path.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(f"wrote {path}")
    return path


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="folder for the JSON results (default: benchmarks/results/)")
    p.add_argument("--quick", action="store_true", help="small batch, few repetitions")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20, quick 5)")
    return p


# ---- this benchmark --------------------------------------------------------------------------
def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="image and pred dtype")
    args = p.parse_args()
    device = pick_device()
    from randsac_fast.ops import patch_loss, patch_targets  # after TRITON_INTERPRET is final

    dtype = DTYPES[args.dtype]
    reps = args.reps or (5 if args.quick else 20)
    if device.type == "cpu":                       # interpreter smoke run
        batch, sizes, patch = 2, (32,), 16
    else:
        batch, sizes, patch = (32 if args.quick else 256), (224, 192), 16
    channels = 3
    bw = copy_bandwidth(device, reps, nbytes=(1 << 20) if device.type == "cpu" else (1 << 30))
    print(f"device copy bandwidth: {bw / 1e9:.1f} GB/s")

    rows, shapes = [], []
    gen = torch.Generator(device=device).manual_seed(0)
    for size in sizes:
        images = torch.rand(batch, channels, size, size, device=device, generator=gen).to(dtype)
        n = (size // patch) ** 2
        k = patch * patch * channels
        perm = torch.argsort(torch.rand(batch, n, device=device, generator=gen), dim=1)
        pred = torch.randn(batch, n, k, device=device, generator=gen).to(dtype).requires_grad_()
        shapes.append({"images": list(images.shape), "patch_size": patch, "perm": list(perm.shape),
                       "dtype": args.dtype})
        img_bytes = images.numel() * images.element_size()
        pred_bytes = pred.numel() * pred.element_size()
        target_bytes = batch * n * k * 4
        for blur in (9, 0):
            for backend in ("reference", "triton"):
                def targets():
                    return patch_targets(images, patch, blur_kernel=blur, blur_sigma=1.0, norm_pix=True,
                                         perm=perm, backend=backend)

                def loss_step():
                    loss = patch_loss(pred, images, patch, perm, blur_kernel=blur, blur_sigma=1.0,
                                      norm_pix=True, loss="mse", backend=backend)
                    torch.autograd.grad(loss, pred)

                # Minimum traffic: targets read the images and write fp32 targets; the loss reads
                # images + pred forward and images + pred backward, and writes dpred.
                for case, fn, nbytes in (("targets", targets, img_bytes + target_bytes),
                                         ("loss fwd+bwd", loss_step, 2 * img_bytes + 3 * pred_bytes)):
                    ms = median_ms(fn, device, reps)
                    rows.append({"case": case, "image": f"{size}x{size}", "blur_k": blur,
                                 "backend": "pytorch" if backend == "reference" else backend,
                                 "median_ms": round(ms, 4), "GB/s": round(nbytes / (ms * 1e-3) / 1e9, 1),
                                 "frac_of_copy_bw": round(nbytes / (ms * 1e-3) / bw, 3), "min_bytes": nbytes})
    meta = {**provenance(device), "benchmark": "targets", "batch": batch, "reps": reps,
            "copy_bandwidth_GBps": round(bw / 1e9, 1), "shapes": shapes, "blur_sigma": 1.0, "norm_pix": True}
    report("targets", rows, ["case", "image", "blur_k", "backend", "median_ms", "GB/s", "frac_of_copy_bw"],
           meta, args.out)


if __name__ == "__main__":
    main()
