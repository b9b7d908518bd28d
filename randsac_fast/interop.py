"""Interoperability: load checkpoints, export the encoder to timm, import SAIM's official weights.

* :func:`load_model` reads what the trainer writes (a ``step_XXXXXXXX`` checkpoint directory) or a
  plain ``torch.save(model.state_dict())`` file, and returns our model.
* :func:`to_timm` turns the encoder of a RandSAC or SAIM model into a state dict for timm's
  ``VisionTransformer``; :func:`timm_kwargs` gives the constructor arguments under which timm's
  ``forward_features`` equals our ``model.forward_features``:

  - RandSAC has no cls token. timm must be built with ``class_token=False`` (its ``pos_embed``
    is then [1, N, D]). A zero cls token would *not* be neutral: it would be a key every token
    attends to, changing the features.
  - Our encoder ends with a per-token LayerNorm, which is timm's ``norm``. timm moves that norm
    after the pooling (``fc_norm``) whenever ``global_pool="avg"`` unless ``fc_norm=False`` is
    passed; with ``fc_norm=False`` the pooled features equal our average-pooled features.

      import timm
      model = timm.create_model("vit_base_patch16_224", pretrained=False, **timm_kwargs(ours))
      model.load_state_dict(to_timm(ours))          # strict: every key matches

* :func:`from_saim_official` builds our SAIM model from a state dict of the official release
  (github qiy20/SAIM ``models_saim.py``: separate q/k/v linears, ``blocks.*``, ``query_blocks.*``,
  ``norm``, ``prediction_head``, ``cls_token``, ``pos_embed`` with a cls row).
* :func:`interpolate_pos_embed` resamples a position-embedding table to another grid (hand-written
  on purpose: timm's ``resample_abs_pos_embed`` does the same bicubic ``F.interpolate``, but timm is
  an optional extra that brings a CUDA build of torch).

* :func:`timm_config` is timm's ``config.json`` for the export: the architecture name of the
  matching size, the constructor arguments and the ``pretrained_cfg`` with the normalisation
  mean/std and input size, so ``timm.create_model("local-dir:DIR", pretrained=True)`` rebuilds it.

CLI: ``python -m randsac_fast.interop export --ckpt PATH [--model NAME] --out DIR|FILE``: a directory
gets ``config.json`` + ``model.safetensors`` (timm's local / hub layout); a ``.pt`` / ``.safetensors``
file gets the weights and ``FILE.json`` beside it with the same config.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import pickle
import re
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import models
from .models import AIM, SAIM, RandSAC, SAIMConfig
from .runtime.summary import print_summary, run_command

__all__ = ["to_timm", "timm_kwargs", "timm_architecture", "timm_config", "export_timm", "from_saim_official", "saim_official_config", "interpolate_pos_embed",
           "load_model", "save_state_dict", "main"]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _full(t: Tensor) -> Tensor:
    """A detached, contiguous CPU copy (a sharded DTensor is gathered first)."""
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().to("cpu", copy=True).contiguous()


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _unwrap(state_dict) -> dict[str, Tensor]:
    """Accept {'model': sd} / {'state_dict': sd} (MAE-style training checkpoints) and DDP's
    ``module.`` prefix; return the bare state dict."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"expected a state dict (a dict of tensors); got {type(state_dict).__name__}")
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _block_count(sd: dict, prefix: str) -> int:
    """Number of ``{prefix}.{i}.`` blocks in a state dict (0 when there are none)."""
    ids = {int(m.group(1)) for k in sd for m in [re.match(rf"{re.escape(prefix)}\.(\d+)\.", k)] if m}
    return max(ids) + 1 if ids else 0


def _shares_blocks(sd: dict) -> bool:
    """SAIM's share_weight: query_blocks *is* blocks, so a state dict holds the same tensors under
    both prefixes (state_dict() lists a shared module once per name)."""
    query = {k[len("query_"):]: v for k, v in sd.items() if k.startswith("query_blocks.")}
    return bool(query) and _block_count(sd, "query_blocks") == _block_count(sd, "blocks") and all(
        k in sd and sd[k].shape == v.shape and torch.equal(sd[k], v) for k, v in query.items())


def _family(sd: dict) -> str:
    """'randsac', 'saim', 'aim' (our layout), 'saim_official', 'timm' or 'unknown', from key names alone."""
    if "blocks.0.attn.q.weight" in sd:
        return "saim_official"
    if "head_norm.weight" in sd and "head.weight" in sd:
        return "aim"
    if any(k.startswith("decoder_blocks.") for k in sd) or ("head.weight" in sd and "decoder_norm.weight" in sd):
        return "randsac"
    if any(k.startswith("query_blocks.") for k in sd) or "prediction_head.weight" in sd \
            or "prediction_head.fc1.weight" in sd:
        return "saim"
    if "blocks.0.attn.qkv.weight" in sd:
        return "timm"
    return "unknown"


_FAMILY_WORDS = {
    "randsac": "a RandSAC model (decoder_blocks.*)",
    "saim": "a SAIM model in randsac_fast's layout (fused attn.qkv)",
    "aim": "an AIM model (one prefix-causal trunk, head_blocks.* MLP head)",
    "saim_official": "an official SAIM checkpoint (separate attn.q/k/v)",
    "timm": "a plain ViT encoder (timm layout: attn.qkv, no decoder or query stream)",
    "unknown": "no model this package knows",
}


# --------------------------------------------------------------------------------------------
# Position embeddings
# --------------------------------------------------------------------------------------------
def interpolate_pos_embed(pos_embed: Tensor, new_grid, *, old_grid=None, num_prefix_tokens: int = 0) -> Tensor:
    """Resample a position-embedding table to another token grid (bicubic, as MAE / timm do for
    fine-tuning at another resolution). Prefix rows (cls) are kept as they are.

    pos_embed: [1, prefix + gh*gw, D]; new_grid: int or (gh', gw'); old_grid: (gh, gw), default
    the square grid the row count implies. Returns [1, prefix + gh'*gw', D] in the input dtype.
    """
    from .orders import grid_shape
    new_h, new_w = grid_shape(new_grid)
    prefix, table = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n, d = table.shape[1], table.shape[2]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"pos_embed has {n} grid rows, which is not a square grid; pass old_grid=(h, w)")
        old_grid = (side, side)
    old_h, old_w = grid_shape(old_grid)
    if old_h * old_w != n:
        raise ValueError(f"old_grid {old_h}x{old_w} has {old_h * old_w} cells but pos_embed has {n} grid rows")
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed.clone()
    x = table.reshape(1, old_h, old_w, d).permute(0, 3, 1, 2).double()
    x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(1, new_h * new_w, d).to(pos_embed.dtype)
    return torch.cat([prefix, x], dim=1)


# --------------------------------------------------------------------------------------------
# Export to timm
# --------------------------------------------------------------------------------------------
def _check_model(model) -> None:
    if not isinstance(model, (RandSAC, SAIM, AIM)):
        raise TypeError(f"expected a RandSAC, SAIM or AIM model from randsac_fast.models.build; got "
                        f"{type(model).__name__}")


def to_timm(model: nn.Module, *, fc_norm: bool = False) -> dict[str, Tensor]:
    """The encoder of ``model`` as a timm ``VisionTransformer`` state dict (CPU tensors).

    Keys: ``patch_embed.proj.*``, ``pos_embed`` ([1, N, D] for RandSAC and AIM, [1, 1 + N, D] with the cls
    row for SAIM), ``cls_token`` (SAIM only), ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2,
    mlp.fc1, mlp.fc2}.*`` and the final norm as ``norm.*`` — or as ``fc_norm.*`` with
    ``fc_norm=True`` (timm's avg-pool default, which normalises the pooled vector instead of each
    token: a fine-tuning start, not the same features). Decoder / query stream / heads are dropped.
    """
    _check_model(model)
    sd = model.state_dict()
    out = {}
    if isinstance(model, SAIM):
        out["cls_token"] = sd["cls_token"]
    out["pos_embed"] = model.pos_embed        # RandSAC and AIM keep it as a non-persistent buffer
    out.update({k: v for k, v in sd.items() if k.startswith(("patch_embed.", "blocks."))})
    norm = "fc_norm" if fc_norm else "norm"
    out[f"{norm}.weight"], out[f"{norm}.bias"] = sd["norm.weight"], sd["norm.bias"]
    return {k: _full(v).float() for k, v in out.items()}          # float32: what timm builds


def timm_kwargs(model: nn.Module, *, fc_norm: bool = False, global_pool: str = "avg") -> dict:
    """Arguments for ``timm.create_model(name, pretrained=False, **kwargs)`` (or timm's
    ``VisionTransformer(**kwargs)``) that fit :func:`to_timm`'s output. ``num_classes=0``: no
    classifier (set it and load with ``strict=False`` to add a fresh head). ``global_pool``: 'avg'
    (mean over patch tokens, the papers' linear-probe protocol) or 'token' (SAIM's cls token)."""
    _check_model(model)
    if global_pool not in ("avg", "token"):
        raise ValueError(f"global_pool must be 'avg' or 'token'; got {global_pool!r}")
    if global_pool == "token" and not isinstance(model, SAIM):
        raise ValueError(f"global_pool='token' needs a cls token, which {type(model).__name__} does not have; use 'avg'")
    blk = model.blocks[0]
    return dict(img_size=tuple(model.img_size), patch_size=model.patch_size, in_chans=model.in_chans,
                embed_dim=model.config.embed_dim, depth=len(model.blocks), num_heads=blk.attn.num_heads,
                mlp_ratio=blk.mlp.fc1.out_features / model.config.embed_dim, qkv_bias=True,
                class_token=isinstance(model, SAIM), global_pool=global_pool, fc_norm=fc_norm, num_classes=0)


def timm_architecture(model: nn.Module) -> str:
    """The timm model name of the encoder's size, e.g. ``vit_tiny_patch16_224`` for a width-192
    encoder: the size word is the standard ViT size (:data:`models.vit.SIZES`, timm's own) with
    the nearest width. :func:`timm_kwargs` sets every dimension (patch and image size included),
    so the name picks timm's ViT family and its defaults, not the shapes."""
    from .models.vit import SIZES
    _check_model(model)
    width = model.config.embed_dim
    size = min(SIZES, key=lambda s: (abs(SIZES[s][0] - width), SIZES[s][0]))
    return f"vit_{size}_patch16_224"


def timm_config(model: nn.Module, mean, std, *, fc_norm: bool = False, global_pool: str = "avg") -> dict:
    """timm's ``config.json`` for :func:`to_timm`'s weights (what ``create_model("local-dir:DIR")``
    and the hub read): ``architecture``, ``num_classes`` 0, ``num_features``, ``global_pool``,
    ``model_args`` (:func:`timm_kwargs`) and ``pretrained_cfg`` with the input size, the
    normalisation ``mean`` / ``std`` the encoder was trained with and the evaluation view (the
    centred largest square, resized: crop_pct 1, center)."""
    kwargs = timm_kwargs(model, fc_norm=fc_norm, global_pool=global_pool)
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != model.in_chans or len(std) != model.in_chans:
        raise ValueError(f"mean {mean} / std {std} need one value per channel ({model.in_chans})")
    return {
        "architecture": timm_architecture(model),
        "num_classes": 0,
        "num_features": model.config.embed_dim,
        "global_pool": global_pool,
        "model_args": {**kwargs, "img_size": list(kwargs["img_size"])},
        "pretrained_cfg": {
            "input_size": [model.in_chans, *model.img_size], "fixed_input_size": True,
            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
            "mean": mean, "std": std, "num_classes": 0,
            "first_conv": "patch_embed.proj", "classifier": "head",
            "tag": f"randsac_fast-{type(model).__name__.lower()}",
        },
    }


_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_EXPORT = "interop export"     # the name randsac_fast.outputs records for the files an export writes


def export_timm(model: nn.Module, out: str, mean, std, *, fc_norm: bool = False, safetensors: bool = False,
                force: bool = False) -> dict:
    """Write the encoder for timm with its metadata; returns :func:`timm_config`.

    ``out`` a directory: ``config.json`` + ``model.safetensors`` (timm's local-dir / hub layout:
    ``timm.create_model("local-dir:" + out, pretrained=True)``). ``out`` a file (``.pt``, ``.pth``,
    ``.bin``; ``.safetensors`` or ``safetensors=True`` for safetensors): the weights, and the same
    config as ``<out without suffix>.json`` beside it (safetensors files also carry it as metadata).
    A path holding another command's files (a run or checkpoint directory, a sidecar name taken) is
    refused with ``randsac_fast.outputs.OutputRefused`` unless ``force``.
    """
    check_export_out(out, force)
    sd = to_timm(model, fc_norm=fc_norm)
    cfg = timm_config(model, mean, std, fc_norm=fc_norm)
    meta = {"timm_kwargs": json.dumps(timm_kwargs(model, fc_norm=fc_norm)), "timm_config": json.dumps(cfg)}
    from .outputs import atomic_text, atomic_write, claim_dir
    if out.endswith(_WEIGHT_SUFFIXES):
        config_path, weights_path = os.path.splitext(out)[0] + ".json", out
        safetensors = safetensors or out.endswith(".safetensors")
    else:
        if os.path.isfile(out):
            raise ValueError(f"--out {out} is a file without a weights suffix; pass a directory (config.json + "
                             f"model.safetensors) or a file ending in one of {', '.join(_WEIGHT_SUFFIXES)}")
        claim_dir(out, _EXPORT, force=True)    # checked above
        config_path, weights_path, safetensors = os.path.join(out, "config.json"), os.path.join(out, "model.safetensors"), True
    # Each file through a temporary name + fsync + rename: an interrupted export leaves the old one whole.
    atomic_write(weights_path, lambda tmp: save_state_dict(sd, tmp, safetensors=safetensors, metadata=meta), _EXPORT)
    atomic_text(config_path, json.dumps(cfg, indent=2), _EXPORT)
    return cfg


def run_normalisation(meta: dict, in_chans: int) -> tuple[tuple, tuple]:
    """The mean/std a checkpoint's run normalised its inputs with: the recorded config's, else the
    data set's own (the trainer's rule; the data set is opened to read them)."""
    from . import data
    d = meta.get("config", {}).get("data", {})
    if d.get("mean") and d.get("std"):
        return tuple(d["mean"]), tuple(d["std"])
    if d.get("data"):
        try:
            source = data.open_source(d["data"], meta["config"].get("model", {}).get("img_size", 32))
        except (OSError, ValueError) as e:
            raise ValueError(f"the run normalised with its data set's mean/std, but {d['data']!r} cannot be opened "
                             f"here ({e}); pass --mean and --std") from None
        return tuple(d.get("mean") or source.mean), tuple(d.get("std") or source.std)
    if in_chans == 3:
        return data.IMAGENET_MEAN, data.IMAGENET_STD
    raise ValueError(f"the checkpoint does not record its normalisation and the model takes {in_chans} channel(s); "
                     "pass --mean and --std (one value per channel)")


def save_state_dict(state_dict: dict[str, Tensor], path: str, *, safetensors: bool = False,
                    metadata: dict[str, str] | None = None) -> None:
    """``torch.save`` a state dict, or write it with safetensors (an optional dependency)."""
    if safetensors:
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise ImportError("--safetensors needs the 'safetensors' package: pip install safetensors "
                              "(or drop --safetensors to write a torch .pt file)") from None
        save_file(state_dict, path, metadata=metadata)
        models.hub.normal_file_mode(path)   # safetensors creates its files 0600; torch.save's get the umask's mode
    else:
        torch.save(state_dict, path)


# --------------------------------------------------------------------------------------------
# Import of SAIM's official checkpoints
# --------------------------------------------------------------------------------------------
#: The official ``SaimViT`` constructor's defaults (models_saim.py), for arguments a state dict
#: cannot tell. num_heads has no default here: it is ``embed_dim // 64`` unless given (every
#: standard ViT size has 64-wide heads).
_OFFICIAL_DEFAULTS = dict(img_size=224, patch_size=16, in_chans=3, mlp_ratio=4.0, query_depth=12,
                          share_weight=False, prediction_head_type="MLP", gaussian_kernel_size=None,
                          gaussian_sigma=None, loss_type="L2", norm_pix_loss=True, drop_path_rate=0.0)
_OFFICIAL_ARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
                  "query_depth", "share_weight", "prediction_head_type", "gaussian_kernel_size",
                  "gaussian_sigma", "loss_type", "norm_pix_loss", "drop_path_rate")


def _check_official(sd: dict) -> None:
    family = _family(sd)
    if family == "saim_official":
        return
    fix = {"randsac": "the SAIM importer reads SAIM checkpoints only; load a RandSAC state dict with "
                      "randsac_fast.interop.load_model(path, 'randsac_vit_...') or model.load_state_dict",
           "saim": "it is already in this package's layout; load it with model.load_state_dict or "
                   "randsac_fast.interop.load_model",
           "timm": "an encoder alone has no query stream to import for SAIM pre-training; load it into timm"}
    raise ValueError(f"not an official SAIM state dict: it holds {_FAMILY_WORDS[family]} — "
                     f"{fix.get(family, 'expected keys such as blocks.0.attn.q.weight')} "
                     f"(keys: {_listing(sd, 6)})")


def _blur_from_kernel(kernel: Tensor) -> tuple[int, float | None]:
    """The official GaussianConv2d buffer [C, 1, k, k] -> (k, sigma). The kernel is
    exp(-d^2 / (2 sigma^2)) normalised, so the ratio of the centre and its neighbour gives sigma."""
    k = kernel.shape[-1]
    if k < 2:
        return k, None
    c = (k - 1) // 2
    ratio = float(kernel[0, 0, c, c + 1] / kernel[0, 0, c, c])
    return k, math.sqrt(-1.0 / (2.0 * math.log(ratio)))


def saim_official_config(state_dict) -> dict:
    """The official constructor arguments a state dict determines: embed_dim, depth, patch_size,
    in_chans, img_size (square grid), mlp_ratio, query_depth and share_weight (when the query
    blocks are separate), prediction_head_type, gaussian_kernel_size / gaussian_sigma (from the
    stored blur kernel). Arguments it cannot tell are absent."""
    sd = _unwrap(state_dict)
    _check_official(sd)
    out = {}
    if "cls_token" in sd:
        out["embed_dim"] = sd["cls_token"].shape[-1]
    out["depth"] = _block_count(sd, "blocks")
    proj = sd.get("patch_embed.proj.weight")
    if proj is not None:
        out["in_chans"], out["patch_size"] = proj.shape[1], proj.shape[-1]
        if proj.shape[-1] != proj.shape[-2]:
            raise ValueError(f"patch_embed.proj.weight has non-square patches {tuple(proj.shape[-2:])}; "
                             "only square patches are supported")
        if "pos_embed" in sd:
            n = sd["pos_embed"].shape[1] - 1
            side = math.isqrt(n)
            if side * side == n:
                out["img_size"] = side * proj.shape[-1]
    if "blocks.0.mlp.fc1.weight" in sd and "embed_dim" in out:
        out["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / out["embed_dim"]
    if "prediction_head.fc1.weight" in sd:
        out["prediction_head_type"] = "MLP"
    elif "prediction_head.weight" in sd:
        out["prediction_head_type"] = "LINEAR"
    q_depth = _block_count(sd, "query_blocks")
    if q_depth and not _shares_blocks(sd):
        out["query_depth"], out["share_weight"] = q_depth, False
    elif q_depth:
        out["share_weight"] = True       # query_depth is not recorded: query_blocks *is* blocks
    if "gaussian_blur.weight" in sd:
        out["gaussian_kernel_size"], sigma = _blur_from_kernel(sd["gaussian_blur.weight"])
        if sigma is not None:
            out["gaussian_sigma"] = sigma
    return out


def _same(key: str, a, b) -> bool:
    if key in ("gaussian_sigma", "mlp_ratio") and a is not None and b is not None:
        return math.isclose(float(a), float(b), rel_tol=1e-3)
    if key == "img_size":
        a, b = (tuple(x) if isinstance(x, (tuple, list)) else (x, x) for x in (a, b))
    return a == b


_QKV = re.compile(r"(.*\.attn)\.([qkv])\.(weight|bias)$")   # official: blocks.3.attn.k.bias


def _official_to_ours(sd: dict) -> dict[str, Tensor]:
    """Rename official keys: attn.q/k/v -> one fused attn.qkv (rows q, k, v); drop the blur buffer."""
    groups = sorted({(m.group(1), m.group(3)) for m in map(_QKV.match, sd) if m})
    lacking = [f"{base}.{p}.{kind}" for base, kind in groups for p in "qkv" if f"{base}.{p}.{kind}" not in sd]
    if lacking:
        raise ValueError(f"the official SAIM state dict lacks {_listing(lacking)} (every attention has q, k and v "
                         "weights and biases); the checkpoint is incomplete")
    out = {}
    for key, val in sd.items():
        m = _QKV.match(key)
        if key == "gaussian_blur.weight" or (m and m.group(2) != "q"):
            continue                     # the blur comes from the config; k, v join q below
        if m:
            base, kind = m.group(1), m.group(3)
            out[f"{base}.qkv.{kind}"] = torch.cat([sd[f"{base}.{p}.{kind}"] for p in "qkv"], dim=0)
        else:
            out[key] = val
    return out


def from_saim_official(state_dict, *, interpolate_pos: bool = False, backend: str = "auto", **config) -> SAIM:
    """Our :class:`~randsac_fast.models.SAIM` with the weights of an official SAIM state dict.

    state_dict: the official model's ``state_dict()`` (or a training checkpoint {'model': ...}).
    config: the official constructor's argument names (img_size, patch_size, in_chans, embed_dim,
    depth, num_heads, mlp_ratio, query_depth, share_weight, prediction_head_type 'MLP'|'LINEAR',
    gaussian_kernel_size, gaussian_sigma, loss_type 'L1'|'L2', norm_pix_loss). Sizes come from the
    state dict (:func:`saim_official_config`); a given value must agree with it. Not recorded in a
    state dict: num_heads (default embed_dim // 64), loss_type (default 'L2'), norm_pix_loss
    (default True), query_depth when share_weight (default 12), and the blur when the checkpoint
    has no ``gaussian_blur.weight`` buffer (default none, as the official constructor).
    img_size different from the checkpoint's: an error, unless ``interpolate_pos=True``, which
    resamples the checkpoint's position embeddings bicubically (:func:`interpolate_pos_embed`, as
    MAE / timm fine-tuning does). The official table is the fixed 2D sin-cos one, so for further
    pre-training the exact table of the new grid, ``vit.sincos_2d(dim, gh, gw, cls_token=True)``,
    is the alternative; the patch embedding and blocks do not depend on the image size.
    The result computes the official loss: same weights + same order -> same loss, where the
    official noise ``noise`` [B, N] corresponds to ``SegmentOrder.from_perm(noise.argsort(1))``.
    """
    sd = _unwrap(state_dict)
    unknown = sorted(set(config) - set(_OFFICIAL_ARGS))
    if unknown:
        raise ValueError(f"unknown SAIM argument(s) {unknown}; the official constructor's arguments are "
                         f"{list(_OFFICIAL_ARGS)}")
    found = saim_official_config(sd)
    for key, val in config.items():
        if key in found and not _same(key, val, found[key]):
            if key == "img_size" and interpolate_pos:
                continue
            hint = (" — pass interpolate_pos=True to resample the position embeddings to the new size, or "
                    "omit img_size" if key == "img_size" else f" — omit {key} (the state dict fixes it)")
            raise ValueError(f"{key}={val!r} does not match the checkpoint, which has {key}={found[key]!r}{hint}")
    args = {**_OFFICIAL_DEFAULTS, **found, **config}
    if "embed_dim" not in args or "patch_size" not in found:
        raise ValueError("the state dict lacks cls_token or patch_embed.proj.weight; "
                         f"missing: {_listing({'cls_token', 'patch_embed.proj.weight'} - set(sd))}")
    if args["drop_path_rate"]:
        raise ValueError(f"drop_path_rate={args['drop_path_rate']} is not supported in pre-training here; "
                         "pass 0 (the official pre-training default)")
    if args["share_weight"] and "query_depth" not in config:
        args["query_depth"] = min(args["query_depth"], args["depth"])
    if args["prediction_head_type"] not in ("MLP", "LINEAR"):
        raise ValueError(f"prediction_head_type must be 'MLP' or 'LINEAR'; got {args['prediction_head_type']!r}")
    if args["loss_type"] not in ("L1", "L2"):
        raise ValueError(f"loss_type must be 'L1' or 'L2'; got {args['loss_type']!r}")
    # The official model blurs only when both kernel size and sigma are given.
    blur = args["gaussian_kernel_size"] is not None and args["gaussian_sigma"] is not None
    num_heads = args.get("num_heads") or args["embed_dim"] // 64
    cfg = SAIMConfig(img_size=args["img_size"], patch_size=args["patch_size"], in_chans=args["in_chans"],
                     embed_dim=args["embed_dim"], depth=args["depth"], num_heads=num_heads,
                     query_depth=args["query_depth"], share_weight=bool(args["share_weight"]),
                     head=args["prediction_head_type"].lower(), mlp_ratio=args["mlp_ratio"],
                     norm_pix=bool(args["norm_pix_loss"]), blur_kernel=int(args["gaussian_kernel_size"]) if blur else 0,
                     blur_sigma=float(args["gaussian_sigma"]) if blur else 1.0,
                     loss="mse" if args["loss_type"] == "L2" else "l1", backend=backend)
    model = SAIM(cfg)
    ours = _official_to_ours(sd)
    if interpolate_pos and "pos_embed" in ours and ours["pos_embed"].shape != model.pos_embed.shape:
        ours["pos_embed"] = interpolate_pos_embed(ours["pos_embed"], model.grid, num_prefix_tokens=1)
    _load_strict(model, ours, "the official SAIM state dict")
    return model


def _load_strict(model: nn.Module, sd: dict, what: str) -> None:
    """load_state_dict with every key and shape checked first, so the error lists all problems."""
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    wrong = [f"{k} {tuple(sd[k].shape)} (model: {tuple(expected[k].shape)})"
             for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {_listing(wrong, 4)}")
    if problems:
        raise ValueError(f"{what} does not fit {type(model).__name__}({_describe(model)}): " + "; ".join(problems)
                         + " — check the model name and size overrides (embed_dim, depth, num_heads, "
                           "img_size, patch_size ...)")
    model.load_state_dict(sd)


def _describe(model) -> str:
    c = model.config
    return f"embed_dim={c.embed_dim}, depth={c.depth}, patch_size={c.patch_size}, img_size={c.img_size}"


# --------------------------------------------------------------------------------------------
# Loading checkpoints
# --------------------------------------------------------------------------------------------
def _infer_overrides(sd: dict, family: str) -> dict:
    """Model sizes a state dict of our layout determines (what models.build accepts)."""
    out = {}
    proj = sd["patch_embed.proj.weight"]
    out.update(embed_dim=proj.shape[0], in_chans=proj.shape[1], patch_size=proj.shape[-1],
               depth=_block_count(sd, "blocks"))
    out["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / proj.shape[0]
    if family == "randsac":
        out["decoder_depth"] = _block_count(sd, "decoder_blocks")
        out["skip_memory"] = "skip_weight" in sd
    elif family == "aim":
        out["head_depth"] = _block_count(sd, "head_blocks")
    else:
        out["share_weight"] = _shares_blocks(sd)
        if not out["share_weight"]:
            out["query_depth"] = _block_count(sd, "query_blocks")
        out["head"] = "mlp" if "prediction_head.fc1.weight" in sd else "linear"
        n = sd["pos_embed"].shape[1] - 1
        if math.isqrt(n) ** 2 == n:
            out["img_size"] = math.isqrt(n) * proj.shape[-1]
    return out


def _read_meta(path: str) -> dict:
    with open(os.path.join(path, "meta.json")) as fh:
        return json.load(fh)


def _load_dcp(path: str, name: str | None, backend: str, overrides: dict):
    """A trainer checkpoint directory (torch.distributed.checkpoint + meta.json with the config)."""
    import torch.distributed.checkpoint as dcp

    from . import config as config_mod
    meta = _read_meta(path)
    mcfg = dict(meta.get("config", {}).get("model", {}))
    if not mcfg:
        raise ValueError(f"{path}/meta.json has no config.model section; is this a randsac_fast checkpoint?")
    fields = set(config_mod.ModelConfig.__dataclass_fields__)
    cfg = config_mod.ModelConfig(**{k: v for k, v in mcfg.items() if k in fields})
    if name is not None and name != cfg.model:
        raise ValueError(f"--model {name} but the checkpoint {path} holds {cfg.model}; drop --model "
                         "(a checkpoint directory names its model)")
    # The trainer takes the channel count from the data, so it is read from the stored weights.
    tensors = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    in_chans = tensors["model.patch_embed.proj.weight"].size[1]
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for a checkpoint directory; valid: {sorted(fields)}")
    for key, val in overrides.items():
        if key not in _MAPPABLE and val != mcfg.get(key):
            was = mcfg.get(key)
            raise ValueError(f"--set {key}={val!r}: the checkpoint {path} was trained with {key}="
                             f"{'the model default' if was is None else repr(was)}, and its weights cannot be mapped "
                             f"to another value; fields that can change: {', '.join(_MAPPABLE)} — drop --set {key}")
    for key, val in {**overrides, "backend": backend}.items():
        setattr(cfg, key, val)
    model = models.build_from_config(cfg, in_chans)       # exactly as the trainer built it
    state = {"model": model.state_dict()}
    pos = state["model"].get("pos_embed")
    saved_pos = tensors.get("model.pos_embed")
    resample = pos is not None and saved_pos is not None and tuple(saved_pos.size) != tuple(pos.shape)
    if resample:   # another img_size: read the saved table, resample it to this grid (bicubic)
        state["model"]["pos_embed"] = torch.empty(tuple(saved_pos.size), dtype=pos.dtype)
    with warnings.catch_warnings():          # a single-process read is what we want here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path)
    if resample:
        state["model"]["pos_embed"] = interpolate_pos_embed(state["model"]["pos_embed"], model.grid,
                                                            num_prefix_tokens=model.num_prefix_tokens)
    model.load_state_dict(state["model"])
    return model, meta


#: Model fields a checkpoint directory's model may be loaded with another value of: they change
#: no weight (backend, the pre-training loss and its targets), or the loader maps the weights
#: (img_size: fixed position embeddings are rebuilt, or a saved table resampled, for the new grid).
_MAPPABLE = ("img_size", "backend", "loss", "norm_pix", "blur_kernel", "blur_sigma")


def load_model(path: str, name: str | None = None, *, backend: str = "auto", **overrides):
    """A model from a checkpoint -> (model in eval mode, meta dict).

    path: a trainer checkpoint directory ``.../checkpoints/step_XXXXXXXX`` (the model and its config
    are read from it; meta is its meta.json, with the training config under 'config'), or a file
    holding ``model.state_dict()`` (optionally as {'model': ...}). A file does not record the model
    name, so ``name`` (e.g. 'randsac_vit_tiny') is required; sizes the state dict shows (width,
    depth, patch size, decoder depth, ...) are read from it and ``overrides`` set the rest
    (num_heads, img_size for RandSAC, ...). An official SAIM file is imported with
    :func:`from_saim_official` (overrides then use the official argument names). meta is {} for files.
    """
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "meta.json")):
            raise FileNotFoundError(f"{path} is a directory but not a complete checkpoint (no meta.json); pass a "
                                    "step_XXXXXXXX directory or a state-dict file")
        with _unreadable(path):
            model, meta = _load_dcp(path, name, backend, overrides)
        return _check_finite(model, path).eval(), meta
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with _unreadable(path):
        sd = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    family = _family(sd)
    if family == "saim_official":
        if name is not None and not name.startswith("saim"):
            raise ValueError(f"--model {name} but {path} is an official SAIM checkpoint; use a saim_vit_* name or none")
        return from_saim_official(sd, backend=backend, **overrides).eval(), {}
    if family not in ("randsac", "saim", "aim"):
        raise ValueError(f"{path} holds {_FAMILY_WORDS[family]} (keys: {_listing(sd, 6)}); expected a RandSAC, "
                         "SAIM or AIM state dict")
    if name is None:
        raise ValueError(f"{path} is a plain state dict of {_FAMILY_WORDS[family]}, which does not record the model "
                         f"name; pass --model {family}_vit_{{tiny,small,base,large}} (and --set num_heads=... if "
                         "it is not the named size's)")
    if not name.startswith(family + "_"):
        raise ValueError(f"--model {name} but {path} holds {_FAMILY_WORDS[family]}; pass --model {family}_vit_...")
    build = {**_infer_overrides(sd, family), **overrides}
    model = models.build(name, backend=backend, **build)
    _load_strict(model, sd, path)
    return _check_finite(model, path).eval(), {}


@contextlib.contextmanager
def _unreadable(path: str):
    """Turn a reader's failure on a damaged file (truncated, not a checkpoint, flipped bytes) into
    one ValueError line; our own ValueErrors (wrong model, missing keys) pass unchanged."""
    try:
        yield
    except ValueError:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, AttributeError, OSError) as e:
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is damaged or not "
                         "a checkpoint — pass an intact step_XXXXXXXX directory or state-dict file") from None


def _check_finite(model: nn.Module, path: str) -> nn.Module:
    """Refuse weights holding NaN / Inf (a diverged run): every result computed from them is noise."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"checkpoint {path} holds non-finite weights (NaN / Inf in {_listing(bad, 3)}); it comes "
                         "from a diverged run — pass an earlier checkpoint of that run")
    return model


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def parse_sets(items) -> dict:
    """['depth=4', 'img_size=32,loss=mse'] -> {'depth': 4, 'img_size': 32, 'loss': 'mse'}: repeated
    ``--set`` flags or one comma-separated list (the list syntax of every command)."""
    out = {}
    for item in [part for group in items or [] for part in re.split(r",(?=\s*\w+=)", group)]:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE (e.g. --set num_heads=3); got {item!r}")
        try:
            val = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            val = text                   # a bare word such as mse
        out[key.strip()] = val
    return out


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="trainer checkpoint directory (step_XXXXXXXX) or a state-dict file")
    p.add_argument("--model", default=None, help="model name for a state-dict file, e.g. randsac_vit_tiny")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="model config overrides, comma-separated (or repeated), e.g. --set num_heads=3,img_size=32")
    p.add_argument("--backend", default="auto", help="attention backend")


def _add_norm_args(p: argparse.ArgumentParser) -> None:
    from .config import comma_list
    p.add_argument("--mean", type=comma_list(float), nargs="+", default=None,
                   help="normalisation mean to record, one value per channel: comma-separated (0.5,0.5,0.5; "
                        "spaces also work) (default: the run's)")
    p.add_argument("--std", type=comma_list(float), nargs="+", default=None,
                   help="normalisation std to record, one value per channel: comma-separated (0.25,0.25,0.25; "
                        "spaces also work) (default: the run's)")


def check_export_out(out: str, force: bool = False) -> None:
    """Refuse an export --out holding another command's files (randsac_fast.outputs), the sidecar included."""
    from . import outputs
    if out.endswith(_WEIGHT_SUFFIXES):
        for path in (out, os.path.splitext(out)[0] + ".json"):
            outputs.claim_file(path, _EXPORT, force=force)
    elif not os.path.isfile(out):
        outputs.check_dir(out, _EXPORT, force=force)


def _check_outputs(args) -> None:
    from . import outputs
    if args.command == "pretrained":
        outputs.check_dir(args.out, "interop pretrained", force=args.force)
    else:
        check_export_out(args.out, args.force)


def main(argv=None) -> int:
    from . import started
    started()                # Ctrl-C is this command's to handle from here
    from . import config as config_mod
    p = config_mod.Parser(prog="python -m randsac_fast.interop",
                          description="Export a RandSAC / SAIM checkpoint: the encoder for timm, or the "
                                      "whole model as a save_pretrained directory.")
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write the encoder as a timm VisionTransformer (weights + config.json)")
    add_checkpoint_args(ex)
    ex.add_argument("--out", required=True,
                    help="a directory (config.json + model.safetensors, timm's local-dir layout) or a file: .pt, "
                         ".safetensors (config beside it as FILE.json)")
    ex.add_argument("--safetensors", action=argparse.BooleanOptionalAction, default=False,
                    help="write a file as safetensors whatever its suffix")
    ex.add_argument("--fc-norm", action=argparse.BooleanOptionalAction, default=False,
                    help="store the final norm as timm's fc_norm (normalises the pooled vector; a fine-tuning "
                         "start, not the same features)")
    _add_norm_args(ex)
    ex.add_argument("--force", action="store_true", help="replace files at --out that another command wrote")
    pre = sub.add_parser("pretrained", help="write the whole model as a save_pretrained directory "
                                            "(models.from_pretrained loads it in one line)")
    add_checkpoint_args(pre)
    pre.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    _add_norm_args(pre)
    pre.add_argument("--force", action="store_true", help="write into an --out that holds another command's files")
    args = p.parse_args(argv)
    from .config import flat
    args.mean, args.std = flat(args.mean), flat(args.std)

    def export(_):
        as_file = args.command == "export" and args.out.endswith(_WEIGHT_SUFFIXES)
        config_mod.check_args(args, {"out": config_mod.writable_file() if as_file else config_mod.writable_dir(),
                                     "mean": config_mod.RULES["mean"], "std": config_mod.RULES["std"]})
        if (args.mean is None) != (args.std is None):
            raise ValueError("pass --mean and --std together (or neither, for the run's own)")
        _check_outputs(args)   # before loading: a refused --out costs nothing
        model, meta = load_model(args.ckpt, args.model, backend=args.backend, **parse_sets(args.set))
        mean, std = (args.mean, args.std) if args.mean else run_normalisation(meta, model.in_chans)
        if args.command == "pretrained":
            model.save_pretrained(args.out, metadata={"mean": list(mean), "std": list(std), "checkpoint": args.ckpt,
                                                      "step": meta.get("step")}, force=args.force)
            print_summary("save_pretrained done", {"checkpoint": args.ckpt, "directory": args.out,
                                                   "model": type(model).__name__},
                          {"load": f"model = randsac_fast.models.from_pretrained({args.out!r})"})
            return
        cfg = export_timm(model, args.out, mean, std, fc_norm=args.fc_norm, safetensors=args.safetensors,
                          force=args.force)
        arch, kwargs, pre_cfg = cfg["architecture"], cfg["model_args"], cfg["pretrained_cfg"]
        rows = {"checkpoint": args.ckpt, "timm weights": args.out if as_file else os.path.join(args.out, "model.safetensors"),
                "timm config": os.path.splitext(args.out)[0] + ".json" if as_file else os.path.join(args.out, "config.json"),
                "architecture": arch, "mean / std": f"{pre_cfg['mean']} / {pre_cfg['std']}"}
        if as_file:
            load = "safetensors.torch.load_file" if args.out.endswith(".safetensors") or args.safetensors else "torch.load"
            hint = (f"model = timm.create_model({arch!r}, pretrained=False, **{kwargs!r}); "
                    f"model.load_state_dict({load}({args.out!r}))")
        else:
            hint = f"model = timm.create_model({'local-dir:' + args.out!r}, pretrained=True)"
        print_summary("timm export done", rows, {"load in timm": hint})
    return run_command(export, errors=(ValueError, TypeError, OSError, ImportError))


if __name__ == "__main__":
    sys.exit(main())
