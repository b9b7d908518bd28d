"""Observability on rank 0: a progress line, ``metrics.jsonl``, TensorBoard scalars (when installed)
with the run's config as hparams (and as text), and optionally Weights & Biases (``--wandb``).

The progress line is hand-written on purpose: it is one ``print`` that works the same on a
terminal (one line overwritten) and in log files (one line per log) on rank 0 only; tqdm would be a
dependency for that one line. wandb is optional: without it installed everything else works, and
``--wandb`` stops with an error naming ``pip install wandb`` before anything runs.

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
import uuid

import torch

__all__ = ["MetricsLogger", "peak_flops", "flops_per_image", "flat_hparams", "require_wandb"]

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


def flat_hparams(config: dict, prefix: str = "") -> dict:
    """A nested config -> {"section/field": int | float | str | bool} (what TensorBoard's hparams
    and wandb take); None and tuples become their text."""
    out = {}
    for key, val in config.items():
        name = f"{prefix}{key}"
        if isinstance(val, dict):
            out.update(flat_hparams(val, name + "/"))
        elif isinstance(val, (bool, int, float, str)):
            out[name] = val
        else:
            out[name] = str(val)
    return out


def require_wandb():
    """The wandb module, or an ImportError that names the fix (call it before anything runs)."""
    try:
        import wandb
    except ImportError:
        raise ImportError("--wandb needs the wandb package: pip install wandb (or drop --wandb)") from None
    return wandb


class MetricsLogger:
    """Writes one JSON object per logged step; does nothing on ranks other than 0.

    config: the run's config (nested dict), logged as TensorBoard hparams + text and as wandb's
    config. metric_tags: the scalars the hparams table shows beside it. wandb: None (off) or
    ``{"project": ...}``; the run id is kept in ``<out>/wandb_id`` so a resumed run continues it.
    """

    def __init__(self, out_dir: str, enabled: bool, total_steps: int, start_step: int = 0, *,
                 config: dict | None = None, metric_tags=("loss",), wandb: dict | None = None):
        self.enabled, self.total = enabled, total_steps
        self.file = self.tb = self.wandb = None
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
        if config is not None and self.tb is not None:
            self._tb_hparams(config, metric_tags)
        if wandb is not None:
            self.wandb = self._wandb_run(out_dir, config or {}, **wandb)

    def _tb_hparams(self, config: dict, metric_tags) -> None:
        """The config in TensorBoard's HParams tab (in this run's own event file, next to its
        scalars, so the table links the two) and, readable whole, in its Text tab."""
        from torch.utils.tensorboard.summary import hparams
        for summary in hparams(flat_hparams(config), {tag: 0.0 for tag in metric_tags}):
            self.tb._get_file_writer().add_summary(summary)
        self.tb.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", self.start_step)

    @staticmethod
    def _wandb_run(out_dir: str, config: dict, project: str = "randsac_fast"):
        wandb = require_wandb()
        id_file = os.path.join(out_dir, "wandb_id")
        if os.path.exists(id_file):
            with open(id_file) as fh:
                run_id = fh.read().strip()
        else:
            run_id = uuid.uuid4().hex[:8]
            with open(id_file, "w") as fh:
                fh.write(run_id + "\n")
        # WANDB_MODE=offline (or `wandb offline`) keeps everything under <out>/wandb.
        return wandb.init(project=project, name=os.path.basename(os.path.normpath(out_dir)), id=run_id,
                          resume="allow", dir=out_dir, config=flat_hparams(config))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        step = record["step"]
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:   # a full disk: one line naming the file and the free space, no traceback
            from ..outputs import OutputError, disk_message
            raise OutputError(e.errno, disk_message(e, self.file.name)) from None
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
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
        for key, label in (("val_top1", "val top-1"), ("knn_top1", "knn top-1")):
            if key in record:
                line += f" {label} {record[key]:.2%}"
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
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
