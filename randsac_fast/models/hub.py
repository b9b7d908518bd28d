"""``save_pretrained`` / ``from_pretrained``: a model as a directory of ``config.json`` + ``model.safetensors``.

The layout is the one HuggingFace's ``PyTorchModelHubMixin`` writes (a config that rebuilds the
model, the weights as safetensors), implemented here rather than inherited: ``huggingface_hub``
brings binary and network dependencies that saving and loading a local directory do not need. A
local directory loads offline; a hub repo id (``owner/name``) is fetched with ``huggingface_hub``
when it is installed, and a saved directory uploads as it is (``huggingface_hub.upload_folder``).

    model.save_pretrained("runs/digits/pretrained")
    model = RandSAC.from_pretrained("runs/digits/pretrained")      # or models.from_pretrained(path)

``config.json``: ``{"format": "randsac_fast", "model_type": "RandSAC" | "SAIM", "config": {every
field of the model's config dataclass}, "randsac_fast_version": ..., "metadata": {...}}``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import torch
from torch import Tensor, nn

__all__ = ["PretrainedMixin", "CONFIG_NAME", "WEIGHTS_NAME", "resolve", "read_config"]

CONFIG_NAME, WEIGHTS_NAME, FORMAT = "config.json", "model.safetensors", "randsac_fast"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve(path: str) -> str:
    """A local directory holding config.json + model.safetensors: ``path`` itself, or a hub repo id
    downloaded with huggingface_hub."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, CONFIG_NAME)):
            if os.path.exists(os.path.join(path, "meta.json")):
                raise ValueError(f"{path} is a trainer checkpoint (meta.json + DCP shards), not a save_pretrained "
                                 f"directory; load it with randsac_fast.interop.load_model({path!r}), or convert it "
                                 f"with: python -m randsac_fast.interop pretrained --ckpt {path} --out DIR")
            raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; pass a directory written by save_pretrained")
        return path
    if os.path.exists(path) or not _REPO_ID.match(path):
        raise FileNotFoundError(f"{path} is not a save_pretrained directory (nor a hub repo id owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{path} is not a local directory; loading it from the hub needs huggingface_hub "
                          "(pip install huggingface_hub), or pass the directory save_pretrained wrote") from None
    return snapshot_download(repo_id=path, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])


def read_config(path: str) -> dict:
    """config.json of a save_pretrained directory (checked to be this package's)."""
    with open(os.path.join(path, CONFIG_NAME)) as fh:
        cfg = json.load(fh)
    if cfg.get("format") != FORMAT or "model_type" not in cfg or "config" not in cfg:
        raise ValueError(f"{path}/{CONFIG_NAME} was not written by randsac_fast's save_pretrained (it has keys "
                         f"{sorted(cfg)}); a timm export loads with timm.create_model('local-dir:{path}')")
    return cfg


def _full_cpu(t: Tensor) -> Tensor:
    """A contiguous CPU copy; a sharded DTensor (FSDP2) is gathered first."""
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().to("cpu", copy=True).contiguous()


def _aliases(model: nn.Module) -> dict[str, str]:
    """State-dict names that are another name's tensor (SAIM's share_weight: query_blocks *is*
    blocks) -> the first name. safetensors stores each tensor once."""
    first, alias = {}, {}
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        if id(t) in first:
            alias[name] = first[id(t)]
        else:
            first[id(t)] = name
    return alias


class PretrainedMixin:
    """``save_pretrained(directory)`` and ``cls.from_pretrained(directory_or_repo_id)`` for a model
    whose ``__init__`` takes its config dataclass's fields as keyword arguments."""

    def save_pretrained(self, directory: str, *, metadata: dict | None = None, force: bool = False) -> str:
        """Write ``directory/config.json`` (the model's config, ``metadata`` — JSON values, e.g. the
        normalisation mean/std — and the package version) and ``directory/model.safetensors``.
        Returns ``directory``. A directory holding another command's files (a run directory, a timm
        export) is refused with ``randsac_fast.outputs.OutputRefused`` unless ``force``."""
        from safetensors.torch import save_file

        from .. import __version__
        directory = os.fspath(directory)
        aliases = _aliases(self)
        weights = {k: _full_cpu(v) for k, v in self.state_dict().items() if k not in aliases}
        config = {"format": FORMAT, "model_type": type(self).__name__.removeprefix("FSDP"),
                  "config": dataclasses.asdict(self.config), "randsac_fast_version": __version__,
                  "metadata": dict(metadata or {})}
        text = json.dumps(config, indent=2)        # before writing anything: metadata must be JSON
        from ..outputs import atomic_text, atomic_write, claim_dir
        claim_dir(directory, "interop pretrained", force=force)
        # temporary name + fsync + rename: an interrupted save leaves the previous files whole
        atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}),
                     "interop pretrained")
        atomic_text(os.path.join(directory, CONFIG_NAME), text + "\n", "interop pretrained")
        normal_file_mode(os.path.join(directory, WEIGHTS_NAME))
        return directory

    @classmethod
    def from_pretrained(cls, path: str, **overrides):
        """The model saved in ``path`` (a save_pretrained directory or a hub repo id), in eval mode.
        ``overrides`` replace config fields, e.g. ``backend="sdpa"``. The saved metadata is
        ``model.pretrained_metadata``."""
        from safetensors.torch import load_file
        local = resolve(path)
        saved = read_config(local)
        if saved["model_type"] != cls.__name__:
            raise ValueError(f"{path} holds a {saved['model_type']} model, not {cls.__name__}; load it with "
                             f"randsac_fast.models.from_pretrained({path!r})")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()}
        try:
            model = cls(**{**fields, **overrides})
        except TypeError as e:
            raise ValueError(f"cannot build {cls.__name__} from {path} with overrides {sorted(overrides)}: {e}") from None
        weights = load_file(os.path.join(local, WEIGHTS_NAME))
        for name, source in _aliases(model).items():
            if source in weights:
                weights.setdefault(name, weights[source])
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        wrong = sorted(k for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(f"{path}/{WEIGHTS_NAME} does not fit its config.json: missing {missing[:6]}, "
                             f"unexpected {unexpected[:6]}, shape mismatches {wrong[:6]}; the directory is "
                             "incomplete or was edited — write it again with save_pretrained")
        model.load_state_dict(weights)
        model.pretrained_metadata = saved.get("metadata", {})
        return model.eval()


def normal_file_mode(path: str) -> None:
    """Give a file the mode an ordinary new file gets, 0666 minus the umask (0644 under 022):
    safetensors creates its files 0600, readable by their owner only."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
