"""randsac_fast: fast RandSAC / SAIM autoregressive-order pre-training for Vision Transformers.

The package's face: ``orders`` (the segment-order contract and its samplers), ``ops`` (the fast
public ops), ``reference`` (the dense reference), ``models``, ``data``, ``config``, ``train``,
``eval``, ``interop`` and ``viz``. The heavier ones are imported on first use, so
``import randsac_fast`` stays cheap and ``randsac_fast.interop`` just works.
"""
import importlib

from . import ops, orders, reference
from .orders import SegmentOrder

__version__ = "0.1.0"

_LAZY = ("config", "data", "eval", "interop", "kernels", "models", "runtime", "train", "viz")
__all__ = ["SegmentOrder", "ops", "orders", "reference", *_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'randsac_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
