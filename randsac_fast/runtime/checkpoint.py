"""Checkpoints: torch.distributed.checkpoint (DCP), written atomically, last k kept.

Layout under ``<out>/checkpoints``::

    step_00000100/      .metadata + DCP shards (model, optimizer: sharded, resharding on load)
                        rank_<r>.pt   this rank's RNG states (torch, cuda, order generator)
                        meta.json     step, data position, schedule, world size (written last)
    .tmp_step_00000200/ a save in progress (or one that crashed): never read

A save writes everything into a temporary directory and then renames it into place, so a crash at
any point leaves the earlier checkpoints untouched, and ``latest`` only ever sees complete ones.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

__all__ = ["Checkpointer", "rng_state", "set_rng_state"]

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state(order_generator: torch.Generator) -> dict:
    """Every random state a rank draws from: global torch (CPU), CUDA, and the order generator."""
    state = {"torch": torch.get_rng_state(), "order": order_generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, order_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    order_generator.set_state(state["order"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: str, write) -> None:
    with open(path, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


class Checkpointer:
    def __init__(self, out_dir: str, keep: int, rank: int, world: int):
        if keep < 1:
            raise ValueError(f"keep must be at least 1; got {keep}")
        self.root = os.path.join(out_dir, "checkpoints")
        self.keep, self.rank, self.world = keep, rank, world

    # ---- finding checkpoints ----------------------------------------------------------------
    def complete(self) -> list[str]:
        """Complete checkpoint directories, oldest first."""
        if not os.path.isdir(self.root):
            return []
        names = sorted(n for n in os.listdir(self.root) if _STEP_DIR.match(n))
        return [os.path.join(self.root, n) for n in names
                if os.path.exists(os.path.join(self.root, n, "meta.json"))]

    def latest(self) -> str | None:
        done = self.complete()
        return done[-1] if done else None

    def resolve(self, resume: str) -> str | None:
        """``latest`` -> newest complete checkpoint in this run (None if there is none yet); else a path."""
        if resume == "latest":
            return self.latest()
        if not os.path.exists(os.path.join(resume, "meta.json")):
            raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint directory "
                                    "(no meta.json); pass 'latest' or a step_XXXXXXXX directory")
        return resume

    # ---- saving -----------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, meta: dict, rank_state: dict) -> str:
        """Collective: every rank calls it. Returns the final directory."""
        name = f"step_{step:08d}"
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, f".tmp_{name}")
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)   # debris of a crashed save of the same step
            os.makedirs(tmp)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        _write_durable(os.path.join(tmp, f"rank_{self.rank}.pt"), lambda fh: torch.save(rank_state, fh))
        dist.barrier()
        if self.rank == 0:
            meta = dict(meta, step=step, world=self.world)
            _write_durable(os.path.join(tmp, "meta.json"),
                           lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
            if os.path.exists(final):  # saving the same step again: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)       # the commit point
            _fsync_dir(self.root)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for n in os.listdir(self.root):  # crashed temporary saves of earlier steps
            if n.startswith(".tmp_step_"):
                shutil.rmtree(os.path.join(self.root, n), ignore_errors=True)

    # ---- loading ----------------------------------------------------------------------------
    def load(self, path: str, model, optimizer) -> tuple[dict, dict | None]:
        """Collective. Loads model and optimizer in place; returns (meta, this rank's state or None)."""
        with open(os.path.join(path, "meta.json")) as fh:
            meta = json.load(fh)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rank_file = os.path.join(path, f"rank_{self.rank}.pt")
        if meta["world"] != self.world or not os.path.exists(rank_file):
            warnings.warn(f"checkpoint {path} was written by {meta['world']} ranks, this run has "
                          f"{self.world}: weights and optimizer are resharded, but random states "
                          "start fresh, so the run will not repeat the original exactly")
            return meta, None
        return meta, torch.load(rank_file, weights_only=False)
