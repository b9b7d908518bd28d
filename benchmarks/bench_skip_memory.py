"""Benchmark: Triton skip memory (Z_l = sum_k W[l, k] H_k) vs the PyTorch einsum.

ViT-B shapes: Lenc=12 encoder states, Ldec=8 decoder memories, B=256, N in {144, 196} (192 and
224 pixel images at P=16), D=768. Forward, and forward + backward (dH and dW), in bf16 by default.
Reports the median time and the achieved fraction of the bandwidth of a plain device copy
measured in the same run, from the minimum traffic: forward reads Lenc states and writes Ldec
memories; backward reads dZ (Ldec) and H (Lenc) and writes dH (Lenc). Prints a table and writes
JSON under ``--out``.

    python benchmarks/bench_skip_memory.py [--quick] [--dtype bf16] [--out benchmarks/results/]

Needs a CUDA device (``TRITON_INTERPRET=1 ... --quick`` smoke-tests the script on the CPU).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DTYPES, copy_bandwidth, median_ms, parser, pick_device, provenance, report,  # noqa: E402
                     result_path, write_json)

CPU_NOTE = "cpu (Triton interpreter: smoke run, not a performance result)"


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="encoder state dtype")
    args = p.parse_args()
    device = pick_device()
    from randsac_fast.ops import skip_memory  # after TRITON_INTERPRET is final

    dtype = DTYPES[args.dtype]
    reps = args.reps or (5 if args.quick else 20)
    lenc, ldec = 12, 8
    if device.type == "cpu":                       # interpreter smoke run
        batch, tokens, dim = 2, (16,), 64
    else:
        batch, tokens, dim = (32 if args.quick else 256), (144, 196), 768
    bw = copy_bandwidth(device, reps, nbytes=(1 << 20) if device.type == "cpu" else (1 << 30))
    print(f"device copy bandwidth: {bw / 1e9:.1f} GB/s")

    rows, shapes = [], []
    path = result_path("skip_memory", args.out)   # rewritten after every row: a killed run keeps its rows
    gen = torch.Generator(device=device).manual_seed(0)
    for n in tokens:
        hidden = torch.randn(lenc, batch, n, dim, device=device, generator=gen).to(dtype).requires_grad_()
        weight = (torch.randn(ldec, lenc, device=device, generator=gen) / lenc).requires_grad_()
        grad_out = torch.randn(ldec, batch, n, dim, device=device, generator=gen).to(dtype)
        shapes.append({"hidden": list(hidden.shape), "weight": list(weight.shape), "dtype": args.dtype})
        state = batch * n * dim * hidden.element_size()          # bytes of one [B, N, D] state
        for backend in ("reference", "triton"):
            def forward():
                with torch.no_grad():
                    return skip_memory(hidden, weight, backend=backend)

            def forward_backward():
                z = skip_memory(hidden, weight, backend=backend)
                torch.autograd.grad(z, (hidden, weight), grad_out)

            for case, fn, nbytes in (("fwd", forward, (lenc + ldec) * state),
                                     ("fwd+bwd", forward_backward, (2 * lenc + 2 * ldec + lenc) * state)):
                ms = median_ms(fn, device, reps)
                rows.append({"case": case, "N": n, "backend": "pytorch" if backend == "reference" else backend,
                             "median_ms": round(ms, 4), "GB/s": round(nbytes / (ms * 1e-3) / 1e9, 1),
                             "frac_of_copy_bw": round(nbytes / (ms * 1e-3) / bw, 3), "min_bytes": nbytes})
                write_json(path, {**provenance(device, cpu_note=CPU_NOTE), "benchmark": "skip_memory", "partial": True, "rows": rows})
        del hidden, grad_out
    meta = {**provenance(device, cpu_note=CPU_NOTE), "benchmark": "skip_memory", "Lenc": lenc, "Ldec": ldec,
            "batch": batch, "dim": dim, "reps": reps, "copy_bandwidth_GBps": round(bw / 1e9, 1), "shapes": shapes}
    report("skip_memory", rows, ["case", "N", "backend", "median_ms", "GB/s", "frac_of_copy_bw"], meta, args.out, path=path)


if __name__ == "__main__":
    main()
