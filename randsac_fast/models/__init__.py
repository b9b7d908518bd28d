"""Models: ``build(name, **overrides)`` for RandSAC, SAIM and AIM ViTs of the standard sizes.

Every model is called as ``model(images, order) -> loss`` and ``model.predict(images, order) ->
(pred, valid)`` in raster order; ``model.forward_features(images)`` is the unmasked encoder.
"""
from __future__ import annotations

import dataclasses

from . import hub
from .aim import AIM, AIMConfig
from .randsac import SENTINEL, RandSAC, RandSACConfig, split_order
from .saim import SAIM, SAIMConfig
from .vit import SIZES, set_backend

__all__ = ["build", "build_from_config", "from_pretrained", "names", "AIM", "AIMConfig", "RandSAC", "RandSACConfig", "SAIM", "SAIMConfig", "SENTINEL", "split_order",
           "set_backend"]

# Paper defaults per size. RandSAC: tiny = CIFAR-10 (32 px, P=4, 3-layer decoder); small = ImageNet-100
# (224 px, P=16, 4-layer decoder with doubled heads); base = ImageNet-1K (192 px, P=16, 8-layer
# decoder); large follows base. SAIM: 224 px, P=16, one query block per encoder block. AIM: 224 px,
# P=14, a 12-block MLP head (AIMConfig's defaults).
_RANDSAC = {
    "tiny": dict(img_size=32, patch_size=4, decoder_depth=3),
    "small": dict(img_size=224, patch_size=16, decoder_depth=4, decoder_num_heads=12),
    "base": dict(img_size=192, patch_size=16, decoder_depth=8),
    "large": dict(img_size=224, patch_size=16, decoder_depth=8),
}


#: Model families: the prefix of a model name (``{family}_vit_{size}``).
FAMILIES = ("randsac", "saim", "aim")


def names() -> list[str]:
    return [f"{m}_vit_{s}" for m in FAMILIES for s in SIZES]


def build(name: str, **overrides):
    """Build ``randsac_vit_{tiny,small,base,large}``, ``saim_vit_{...}`` or ``aim_vit_{...}`` with
    config overrides."""
    method, _, size = name.partition("_vit_")
    if method not in FAMILIES or size not in SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {names()}")
    dim, depth, heads = SIZES[size]
    if method == "randsac":
        cls, cfg_cls, base = RandSAC, RandSACConfig, dict(_RANDSAC[size])
    elif method == "aim":
        cls, cfg_cls, base = AIM, AIMConfig, {}
    else:
        cls, cfg_cls, base = SAIM, SAIMConfig, dict(query_depth=depth)
    base.update(embed_dim=dim, depth=depth, num_heads=heads)
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name}; valid: {sorted(fields)}")
    if method == "saim" and "depth" in overrides and "query_depth" not in overrides:
        base["query_depth"] = overrides["depth"]
    base.update(overrides)
    return cls(cfg_cls(**base))


def from_pretrained(path: str, **overrides):
    """A RandSAC, SAIM or AIM model from a ``save_pretrained`` directory (or hub repo id): the class is
    read from its config.json. ``overrides`` replace config fields (e.g. ``backend="sdpa"``)."""
    local = hub.resolve(path)
    model_type = hub.read_config(local)["model_type"]
    classes = {"RandSAC": RandSAC, "SAIM": SAIM, "AIM": AIM}
    if model_type not in classes:
        raise ValueError(f"{path} holds model_type {model_type!r}; this version knows {sorted(classes)}")
    return classes[model_type].from_pretrained(local, **overrides)


# Model fields passed to models.build only when set (None: the model's own default).
_MODEL_OVERRIDES = ("embed_dim", "depth", "num_heads", "decoder_depth", "decoder_num_heads", "query_depth",
                    "share_weight", "head", "skip_memory", "head_depth", "blur_kernel", "blur_sigma", "norm_pix",
                    "loss")
# Fields only one family has: a preset's value is dropped for the other family, a flag is passed on
# (and rejected by models.build with a clear error).
_FAMILY_ONLY = {"randsac": ("query_depth", "share_weight", "head", "head_depth"),
                "saim": ("decoder_depth", "decoder_num_heads", "skip_memory", "head_depth"),
                "aim": ("decoder_depth", "decoder_num_heads", "skip_memory", "query_depth", "share_weight", "head")}


def build_from_config(cfg, in_chans: int, flags=()):
    """The model a run config describes (``randsac_fast.config.ModelConfig``), as the trainer builds it.

    ``flags`` names the fields the user set on the command line: a preset's value of a field the
    other family does not have is dropped, a flag is passed on (and rejected with a clear error).
    """
    if cfg.img_size % cfg.patch_size:
        raise ValueError(f"image size {cfg.img_size} is not divisible by patch size {cfg.patch_size}; "
                         f"choose --img-size a multiple of {cfg.patch_size}")
    other = _FAMILY_ONLY.get(cfg.model.partition("_")[0], ())
    overrides = {k: getattr(cfg, k) for k in _MODEL_OVERRIDES
                 if getattr(cfg, k) is not None and (k not in other or k in flags)}
    return build(cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=in_chans,
                 backend=cfg.backend, **overrides)
