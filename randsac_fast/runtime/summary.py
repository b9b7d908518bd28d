"""How every command ends: a short summary when it worked, one error line when it did not.

:func:`run_command` wraps a command's body. Bad input (the error types the command names) becomes
one line ``error: ...`` on stderr and exit code 1, with no traceback; bugs keep their traceback.
Under torchrun every rank runs the same validation, so an error raised before the process group
exists is printed by rank 0 only; after that, identical messages from several ranks are printed
once (deduplicated through the process group's store) and a rank that lost contact with a failed
peer (gloo: "Connection closed by peer") says so in one line and exits instead of hanging.

:func:`print_summary` prints the block a finished command ends with: run directory, checkpoint,
metrics and TensorBoard location, the result, and the next commands with their paths filled in.
:func:`write_results` writes the ``results.json`` every evaluation command leaves behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import sys
import time

import torch.distributed as dist

__all__ = ["run_command", "print_summary", "command", "write_results", "report_error"]

# Survivors of a peer's failure see these from the collective they were in (gloo; NCCL would hang
# until its timeout, but torchrun stops the other workers as soon as one exits).
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _first_to_say(text: str) -> bool:
    """True on the first rank to report ``text`` (an atomic counter in the process group's store)."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store
        key = "randsac_fast/error/" + hashlib.sha1(text.encode()).hexdigest()
        return _get_default_store().add(key, 1) == 1
    except Exception:   # no store (or it went away with a failed rank): say it rather than lose it
        return True


def _tell_torchrun(text: str) -> None:
    """torchrun's failure report shows the message a worker leaves in its error file in place of
    "To enable traceback see: ...", so the report names the cause."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError):
            with open(path, "w") as fh:
                json.dump({"message": {"message": f"error: {text}", "extraInfo": {
                    "py_callstack": f"error: {text}", "timestamp": str(int(time.time()))}}}, fh)


def report_error(text: str) -> None:
    """Print ``error: text`` once per run (see the module docstring for which rank prints)."""
    _tell_torchrun(text)
    rank, world = _rank_world()
    if not dist.is_initialized():
        if rank != 0:
            return
    elif world > 1 and not _first_to_say(text):
        return
    where = f" (rank {rank} of {world})" if world > 1 and rank != 0 else ""
    print(f"error{where}: {text}", file=sys.stderr, flush=True)


def run_command(body, argv=None, errors: tuple = (ValueError, FileNotFoundError, ImportError)) -> int:
    """Run ``body(argv)``; return 0, or 1 after one error line for an exception in ``errors``, a
    file-system failure (full disk, read-only, a file where a directory should be: the path and the
    free space) or a lost peer. Ends the process group either way."""
    try:
        code = body(argv)
        return code if isinstance(code, int) else 0
    except OSError as e:
        from ..outputs import DISK_ERRNOS, disk_message
        if not (isinstance(e, errors) or e.errno in DISK_ERRNOS):
            raise
        report_error(disk_message(e) if e.errno in DISK_ERRNOS and type(e).__name__ != "OutputError" else str(e))
        return 1
    except errors as e:
        report_error(str(e))
        return 1
    except RuntimeError as e:
        if not (dist.is_initialized() and any(s in str(e) for s in _LOST_PEER)):
            raise
        report_error("another process of this run stopped (its error is above); stopping too")
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def command(module: str, *args) -> str:
    """A shell command line: ``python -m randsac_fast.<module> args...``, each argument quoted."""
    return " ".join(["python", "-m", f"randsac_fast.{module}", *(shlex.quote(str(a)) for a in args)])


def print_summary(title: str, rows: dict, next_steps: dict | None = None, file=None) -> str:
    """Print (and return) the closing block of a command.

    rows: label -> value (None values are left out), e.g. {"run directory": "runs/x", "result": ...}.
    next_steps: label -> a command line (see :func:`command`).
    """
    rows = {k: v for k, v in rows.items() if v is not None}
    width = max([len(k) for k in rows] + [len(k) for k in (next_steps or {})] + [1])
    lines = [f"== {title} =="] + [f"  {k.ljust(width)}  {v}" for k, v in rows.items()]
    if next_steps:
        lines.append("next:")
        lines += [f"  {k.ljust(width)}  {v}" for k, v in next_steps.items()]
    text = "\n".join(lines)
    print(text, file=file or sys.stdout, flush=True)
    return text


def write_results(out_dir: str, result: dict, name: str = "results.json") -> str:
    """Write ``result`` as JSON under ``out_dir``; return the path."""
    from ..outputs import atomic_text
    return atomic_text(os.path.join(out_dir, name), json.dumps(result, indent=2) + "\n")


def metrics_rows(out_dir: str) -> dict:
    """The summary rows that point at a run's logs (those that exist)."""
    jsonl, tb = os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "tb")
    return {"metrics": jsonl if os.path.exists(jsonl) else None,
            "tensorboard": f"tensorboard --logdir {shlex.quote(tb)}" if os.path.isdir(tb) else None}


def _labelled_data(data: str) -> str | None:
    """What the evaluation commands can take for the data a run pre-trained on, if anything:
    digits, CIFAR pickles, or the evaluation root whose train/ the run used."""
    if data == "digits":
        return data
    if os.path.isdir(data):
        names = set(os.listdir(data))
        if "data_batch_1" in names or {"train", "meta"} <= names:
            return data
        parent = os.path.dirname(os.path.normpath(data))
        if os.path.basename(os.path.normpath(data)) == "train" and os.path.isdir(os.path.join(parent, "val")):
            return parent
    return None


def pretrain_summary(out: str, checkpoint: str | None, data: str, probe: dict | None) -> str:
    """The closing block of a pre-training run (rank 0); ``probe``: the trainer's probe result."""
    rows = {"run directory": out, "config": os.path.join(out, "config.json"), "checkpoint": checkpoint,
            **metrics_rows(out)}
    if probe is not None:
        rows["result"] = (f"linear probe accuracy {probe['pretrained']:.4f} pre-trained, {probe['random_init']:.4f} "
                          f"random-init encoder, {probe['raw_pixels']:.4f} raw pixels (digits test split)")
        rows["result file"] = probe["path"]
    steps = {}
    if checkpoint:
        labelled = _labelled_data(data)
        steps["linear probe"] = command("linprobe", "--ckpt", checkpoint, "--data", labelled or "LABELLED_DIR",
                                        "--out", os.path.join(out, "linprobe"))
        if labelled is None:
            steps["linear probe"] += "    # LABELLED_DIR: a directory with train/ and val/ class folders"
        steps["attn probe"] = command("attnprobe", "--ckpt", checkpoint, "--data", labelled or "LABELLED_DIR",
                                      "--out", os.path.join(out, "attnprobe"))
        # A directory (config.json + model.safetensors): what timm.create_model("local-dir:DIR") loads.
        steps["timm export"] = command("interop", "export", "--ckpt", checkpoint, "--out", os.path.join(out, "timm"))
        steps["figure"] = command("viz", "recon", "--ckpt", checkpoint, "--images", data,
                                  "--out", os.path.join(out, "recon.png"))
    steps["reproduce"] = command("train", "--config", os.path.join(out, "config.json"), "--out", out + "_again")
    return print_summary("pre-training done", rows, steps)


def eval_summary(task: str, out: str, checkpoint: str | None, result: dict, results_file: str,
                 next_steps: dict | None = None) -> str:
    """The closing block of an evaluation command (rank 0)."""
    rows = {"run directory": out, "checkpoint": checkpoint, **metrics_rows(out),
            "result": f"top-1 {result['top1']:.4f} top-5 {result['top5']:.4f} "
                      f"({result['val_images']} validation images)",
            "results file": results_file}
    return print_summary(f"{task} done", rows, next_steps)
