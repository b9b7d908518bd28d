"""Observability on rank 0: a progress line, ``metrics.jsonl``, TensorBoard scalars (when installed).

MFU counts model FLOPs per image as ``model.flops_per_image(order)`` or
``model.train_flops(order) / batch`` when the model provides one, else the dense estimate 6 * parameters * tokens (forward + backward of every weight matmul,
attention ignored), and divides by the device's peak bf16 dense FLOP/s.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

__all__ = ["MetricsLogger", "peak_flops", "flops_per_image"]

# Dense bf16 tensor-core peak, FLOP/s, by device-name substring (vendor data sheets).
_PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
              "4090": 165e12, "V100": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in _PEAK_BF16.items():
        if key in name:
            return val
    return None


def flops_per_image(model, order, num_params: int) -> tuple[float, str]:
    """(training FLOPs per image, how they were counted)."""
    fn = getattr(model, "flops_per_image", None)
    if callable(fn):
        return float(fn(order)), "model.flops_per_image"
    fn = getattr(model, "train_flops", None)     # FLOPs of one training step on this batch
    if callable(fn):
        return float(fn(order)) / order.batch, "model.train_flops / batch"
    return 6.0 * num_params * order.num_tokens, "6 * params * tokens"


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLogger:
    """Writes one JSON object per logged step; does nothing on ranks other than 0."""

    def __init__(self, out_dir: str, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled, self.total = enabled, total_steps
        self.file = self.tb = None
        self.tty = sys.stderr.isatty()
        self.start_time, self.start_step = time.perf_counter(), start_step
        if not enabled:
            return
        self.file = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except ImportError:  # tensorboard is optional; metrics.jsonl has the same numbers
            self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        step = record["step"]
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        done = step - self.start_step
        eta = (self.total - step) * (time.perf_counter() - self.start_time) / max(done, 1)
        frac = step / max(self.total, 1)
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        line = (f"[{bar}] step {step}/{self.total} loss {record['loss']:.4f} "
                f"lr {record['lr']:.2e} {record['img_per_s']:.0f} img/s ETA {_format_eta(eta)}")
        if "data_wait_frac" in record:
            line += f" data-wait {record['data_wait_frac']:.0%}"
        if "mfu" in record:
            line += f" mfu {record['mfu']:.1%} mem {record['max_mem_gib']:.1f} GiB"
        # Overwrite one line on a terminal; one line per log otherwise (files, CI logs).
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr,
              flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self.tty else "") + text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and self.enabled:
            print(file=sys.stderr)
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
