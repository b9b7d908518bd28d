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
    path = result_path("targets", args.out)   # rewritten after every row: a killed run keeps its rows
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
                    write_json(path, {**provenance(device, cpu_note=CPU_NOTE), "benchmark": "targets", "partial": True, "rows": rows})
    meta = {**provenance(device, cpu_note=CPU_NOTE), "benchmark": "targets", "batch": batch, "reps": reps,
            "copy_bandwidth_GBps": round(bw / 1e9, 1), "shapes": shapes, "blur_sigma": 1.0, "norm_pix": True}
    report("targets", rows, ["case", "image", "blur_k", "backend", "median_ms", "GB/s", "frac_of_copy_bw"],
           meta, args.out, path=path)


if __name__ == "__main__":
    main()
