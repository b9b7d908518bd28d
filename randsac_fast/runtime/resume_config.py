"""Resuming with changed settings: the checkpoint's config against the new run's.

Three kinds of field:

- **model shape** (:data:`SHAPE_FIELDS`): a change is refused, always, with one line naming the
  field (the weights could not load, or would mean something else, e.g. another head count);
- **free** (:data:`FREE_FIELDS`): where output goes, cadences, monitors, speed switches (backend,
  compile, activation checkpointing, FSDP units or master weights, workers): they do not change what is computed, so they may
  differ silently;
- **training settings** (every other field: batch size, accumulation, seed, segment order, steps,
  data and augmentation, targets and loss, every optimizer field): a change makes the resumed run
  a different run than the one checkpointed, so it is refused unless ``--allow-changed`` is given;
  then each change is printed as one warning line (``field old -> new``).

A field that is new since the checkpoint was written (absent from its config) is not compared.
"""
from __future__ import annotations

import os
import warnings

import torch

__all__ = ["SHAPE_FIELDS", "FREE_FIELDS", "compare", "check_resume"]

SHAPE_FIELDS = ("model", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_depth",
                "decoder_num_heads", "query_depth", "share_weight", "head", "skip_memory")
FREE_FIELDS = ("backend", "workers", "knn_data", "out", "resume", "ckpt_every", "keep", "log_every", "compile",
               "ac", "fsdp_units", "master_weights", "probe", "knn_every", "knn_k", "knn_images", "device", "threads", "allow_changed", "force", "wandb",
               "wandb_project")
_SECTIONS = ("model", "data", "optim", "train")


def _flat(cfg: dict) -> dict:
    def norm(v):
        return tuple(norm(x) for x in v) if isinstance(v, (list, tuple)) else v
    return {k: norm(v) for sec in _SECTIONS for k, v in (cfg.get(sec) or {}).items()}


def _resolved_model(cfg: dict, in_chans: int) -> dict:
    """The model fields as built (None -> the model's default), from a config dict; {} if it cannot be built."""
    from .. import config as config_mod
    from .. import models
    fields = set(config_mod.ModelConfig.__dataclass_fields__)
    try:
        mcfg = config_mod.ModelConfig(**{k: v for k, v in cfg.get("model", {}).items() if k in fields})
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = models.build_from_config(mcfg, in_chans, cfg.get("flags", ()))
        built = vars(model.config)
    except Exception:   # e.g. a model name this version no longer knows: compare the raw values
        return {}
    return {k: built[k] for k in SHAPE_FIELDS if k in built} | {"model": mcfg.model}


def compare(saved: dict, current: dict, in_chans: int) -> tuple[list[tuple], list[tuple]]:
    """(model-shape changes, training-setting changes), each a list of (field, saved value, new value)."""
    old, new = _flat(saved), _flat(current)
    old_model, new_model = _resolved_model(saved, in_chans), _resolved_model(current, in_chans)
    if old_model and new_model:   # compare what was built; fields the family does not have drop out
        unused = set(SHAPE_FIELDS) - set(new_model)
        old = {k: v for k, v in (old | old_model).items() if k not in unused}
        new = {k: v for k, v in (new | new_model).items() if k not in unused}
    shape, training = [], []
    for key in new:
        if key not in old or key in FREE_FIELDS or old[key] == new[key]:
            continue
        (shape if key in SHAPE_FIELDS else training).append((key, old[key], new[key]))
    return shape, training


def _own_settings(path: str) -> str:
    """How to resume with the settings the checkpoint's run was started with: its config.json."""
    run_dir = os.path.dirname(os.path.dirname(os.path.normpath(path)))   # OUT/checkpoints/step_X -> OUT
    config = os.path.join(run_dir, "config.json")
    if os.path.exists(config):
        return f"resume with the run's own settings: --config {config} --resume {path}"
    return "resume with the settings the run was started with"


def _shown(value):
    """A square size as its side (the model records img_size as (16, 16); the flag is 16)."""
    return value[0] if isinstance(value, tuple) and len(value) == 2 and value[0] == value[1] else value


def _changes(fields: list[tuple]) -> str:
    return ", ".join(f"{k} {_shown(was)!r} -> {_shown(now)!r}" for k, was, now in fields)


def check_resume(path: str, saved: dict, current: dict, in_chans: int, allow_changed: bool) -> list[str]:
    """Raise ValueError on a model-shape change, or on a training-setting change without
    ``allow_changed``; else return the warning lines to print (one per changed setting).

    The refusals name every differing field (a preset's or a default's values differ as much as
    a flag's) and the fix that always works: the run's own ``--config RUN/config.json``."""
    shape, training = compare(saved, current, in_chans)
    if shape:
        key, was, now = shape[0]
        more = f" (all model changes: {_changes(shape)})" if len(shape) > 1 else ""
        raise ValueError(f"--resume {path}: the checkpoint's model has {key}={_shown(was)!r}, this run asks for "
                         f"{key}={_shown(now)!r}{more}; a model-shape change cannot resume: {_own_settings(path)}, or "
                         "start the new model in another --out")
    if training and not allow_changed:
        raise ValueError(f"--resume {path}: training settings differ from the checkpoint's ({_changes(training)}); "
                         f"pass --allow-changed to resume with the new values, or {_own_settings(path)}")
    return [f"warning: resuming {path} with a changed training setting: {k} {was!r} -> {now!r}"
            for k, was, now in training]
