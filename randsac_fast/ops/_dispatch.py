"""Backend selection shared by the public ops.

Each op keeps a table ``name -> loader``; a loader imports its implementation lazily so that a
missing optional dependency (triton, xformers, the compiled extension) only matters when that
backend is asked for, and then raises one error that says what is missing and how to get it.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

BACKENDS = ("auto", "reference", "sdpa", "sdpa_causal", "flex", "xformers", "triton", "cuda")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (missing package, no GPU, extension not built)."""


def lazy(module: str, attr: str) -> Callable[[], Callable]:
    """A loader that imports ``randsac_fast.<module>.<attr>`` on first use and caches it.

    The cache matters for ``torch.compile(fullgraph=True)``: dynamo cannot trace an import, but it
    can trace a lookup of an already-loaded function (resolve once eagerly, e.g. when the model is
    first run, before compiling)."""
    cache: list = []

    def load():
        if not cache:
            try:
                mod = importlib.import_module(f"randsac_fast.{module}")
            except ImportError as e:  # a missing optional dependency
                raise BackendUnavailable(str(e)) from e
            cache.append(getattr(mod, attr))
        return cache[0]
    return load


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(op: str, backend: str, table: dict[str, Callable[[], Callable]], device: torch.device,
            auto_order: tuple[str, ...]) -> Callable:
    """Return the implementation of ``op`` for ``backend`` (``auto``: first that loads)."""
    if backend == "auto":
        errors = []
        for name in auto_order:
            try:
                return table[name]()
            except BackendUnavailable as e:
                errors.append(f"{name}: {e}")
        raise BackendUnavailable(f"{op}: no backend available ({'; '.join(errors)})")
    if backend not in table:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {sorted(table) + ['auto']}")
    try:
        return table[backend]()
    except BackendUnavailable as e:
        raise BackendUnavailable(f"{op}: backend {backend!r} is not available: {e}") from None


def auto_order(device: torch.device, fast: tuple[str, ...], fallback: tuple[str, ...]) -> tuple[str, ...]:
    """On CUDA try the fast backends first; elsewhere (CPU) only the portable fallbacks."""
    return fast + fallback if device.type == "cuda" else fallback


_CHECKS = os.environ.get("RANDSAC_FAST_CHECKS", "1") not in ("0", "")


def set_checks(enabled: bool) -> None:
    """Turn the data-dependent input checks (seg sortedness, perm range) on or off globally.

    They cost one device->host sync per call; the trainer turns them off after its first step.
    """
    global _CHECKS
    _CHECKS = bool(enabled)


def checks_enabled(flag: bool | None) -> bool:
    if flag is not None:
        return not torch.compiler.is_compiling() and flag
    return not torch.compiler.is_compiling() and _CHECKS
