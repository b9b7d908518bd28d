"""Public ops. Each takes ``backend=`` and dispatches; see each module for its contract."""
from ._dispatch import BACKENDS, BackendUnavailable, checks_enabled, set_checks
from .attention import segment_attention, segment_attention_cross, segment_attention_qkv, visible_pairs
from .attention_bounds import SegmentBounds, segment_bounds
from .skip import skip_memory
from .targets import masked_patch_loss, patch_loss, patch_targets

__all__ = ["BACKENDS", "BackendUnavailable", "set_checks", "checks_enabled", "segment_attention", "visible_pairs",
           "segment_attention_qkv", "segment_attention_cross", "SegmentBounds", "segment_bounds", "patch_targets",
           "patch_loss", "masked_patch_loss", "skip_memory"]
