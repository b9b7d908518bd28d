"""randsac_fast: fast RandSAC / SAIM autoregressive-order pre-training for Vision Transformers."""
from . import ops, orders, reference
from .orders import SegmentOrder

__version__ = "0.1.0"
__all__ = ["SegmentOrder", "ops", "orders", "reference", "__version__"]
