"""Backend selection shared by the public ops.

Each op keeps a table ``name -> loader``; a loader imports its implementation lazily so that a
missing optional dependency (triton, xformers, the compiled extension) only matters when that
backend is asked for, and then raises one error that says what is missing and how to get it.

A named backend is used as asked. ``auto`` (for ops that :func:`register` their self-check
problems) walks the op's preference order — fast backends first on CUDA tensors, the portable
fallback only on CPU tensors — and keeps a backend only if it loads and passes its one-time
self-check on this device (:mod:`.selfcheck`); among the verified ones it takes the fastest for
the shape (:mod:`.autotune`; on CUDA by default), else the first. The choice is cached per
(op, device, dtype, structure, shape): the steady state is one dict lookup, no host sync. Under
``torch.compile`` the choice is a trace-time constant (``torch._dynamo.assume_constant_result``):
the check and the timing run eagerly while dynamo traces, and the graph holds only the chosen op.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import autotune, selfcheck

BACKENDS = ("auto", "reference", "sdpa", "flex", "xformers", "triton", "cuda")


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


@dataclass(frozen=True)
class Problems:
    """What :func:`resolve` needs to verify and time an op's backends (see :mod:`.cases`).

    check(device, dtype, structure) -> a small :class:`~.selfcheck.Case`;
    timing(device, dtype, structure, shape) -> a Case at the call's shape (None: never timed);
    reference: the backend the check compares against (run in the same dtype and in float64);
    trusted: backends that are not checked (the reference itself, plain PyTorch fallbacks).
    """
    table: dict
    fast: tuple[str, ...]
    fallback: tuple[str, ...]
    check: Callable
    timing: Callable | None = None
    reference: str = "reference"
    trusted: tuple[str, ...] = ("reference",)

    def order(self, device: torch.device) -> tuple[str, ...]:
        """``auto``'s candidates in preference order (CPU tensors: the fallbacks only)."""
        return auto_order(device, self.fast, self.fallback)


_PROBLEMS: dict[str, Problems] = {}
_CHOICES: dict[tuple, str] = {}
selfcheck.ON_MODE_CHANGE.append(_CHOICES.clear)


def register(op: str, table: dict, *, fast: tuple[str, ...], fallback: tuple[str, ...], check: Callable,
             timing: Callable | None = None, reference: str = "reference",
             trusted: tuple[str, ...] = ("reference",)) -> None:
    """Make ``auto`` for ``op`` verified (and, with ``timing``, measured): on CUDA tensors its
    candidates are ``fast`` then ``fallback``, on other devices ``fallback`` only."""
    _PROBLEMS[op] = Problems(table, tuple(fast), tuple(fallback), check, timing, reference, tuple(trusted))


def static(values: tuple) -> tuple:
    """Plain Python ints / bools / strings of values that may be symbolic under torch.compile.

    Formatting a symbolic size makes dynamo specialise the graph on its value (a guard), which is
    what a per-shape choice needs, like cudnn.benchmark; eager values pass through unchanged.
    """
    if not torch.compiler.is_compiling():
        return tuple(values)
    out = []
    for value in values:
        text = f"{value}"
        out.append(True if text == "True" else False if text == "False"
                   else int(text) if text.lstrip("-").isdigit() else text)
    return tuple(out)


def clear_choices() -> None:
    """Forget every ``auto`` choice, verdict and timing of this process (tests; a new device state)."""
    _CHOICES.clear()
    selfcheck.clear()
    autotune.clear()


def verify(op: str, backend: str, device: torch.device, dtype: torch.dtype, structure: tuple,
           impl: Callable | None = None) -> "selfcheck.Verdict":
    """The (cached) self-check verdict of ``backend`` for ``op`` on this device, dtype and structure."""
    problems = _PROBLEMS[op]
    impl = impl if impl is not None else problems.table[backend]()
    plain = problems.table[problems.reference]()
    return selfcheck.verify(op, backend, impl, plain, lambda: problems.check(device, dtype, structure),
                            (str(device), str(dtype).removeprefix("torch."), *structure), device)


def registered() -> dict[str, Problems]:
    """op name -> its registered problems (the ops ``auto`` verifies)."""
    return dict(_PROBLEMS)


def choose(op: str, device: torch.device, dtype: torch.dtype, structure: tuple, shape: tuple,
           order: tuple[str, ...]) -> str:
    """The backend name ``auto`` uses for this call (verified, then measured); cached.

    Called eagerly on the first eager call of a key and once per trace under torch.compile, where
    its result is a constant: nothing it runs enters the graph. The self-check mode and the
    autotune switch are read when a key is first chosen (:func:`selfcheck.set_mode` forgets the
    choices made so far).
    """
    memo = (op, device, dtype, structure, shape)
    name = _CHOICES.get(memo)
    if name is not None:
        return name
    problems = _PROBLEMS[op]
    verified: dict[str, Callable] = {}
    errors = []
    timing = problems.timing is not None and autotune.enabled(device)
    for candidate in order:
        try:
            impl = problems.table[candidate]()
        except BackendUnavailable as e:
            errors.append(f"{candidate}: {e}")
            continue
        if candidate not in problems.trusted:
            verdict = verify(op, candidate, device, dtype, structure, impl)
            if not verdict.ok:
                errors.append(f"{candidate}: self-check {verdict.status} ({verdict.summary()[:200]})")
                continue
        verified[candidate] = impl
        if not timing:
            break
    if not verified:
        raise BackendUnavailable(f"{op}: no backend available ({'; '.join(errors)})")
    name = next(iter(verified))
    if timing and len(verified) > 1:
        key = autotune.shape_key(op, device, dtype, structure, shape)
        name = autotune.best(key, verified, lambda: problems.timing(device, dtype, structure, shape), device)
    _CHOICES[memo] = name
    return name


# What torch._dynamo.assume_constant_result(choose) does (it only sets this flag), without importing
# torch._dynamo here: that import takes seconds and imports triton, which must not happen before a
# test or `randsac_fast.info` has chosen the Triton interpreter. tests/test_dispatch.py checks it holds.
choose._dynamo_marked_constant = True


def resolve(op: str, backend: str, table: dict[str, Callable[[], Callable]], device: torch.device,
            auto_order: tuple[str, ...] | None = None, *, dtype: torch.dtype | None = None,
            structure: tuple | None = None, shape: tuple = ()) -> Callable:
    """Return the implementation of ``op`` for ``backend``.

    ``auto``: for a registered op given ``dtype`` and ``structure`` (the plain values the self-check
    problem depends on, e.g. head dim, inclusive, layout) and ``shape`` (what timing keys on), the
    verified and measured choice of :func:`choose` among the registered candidates; otherwise the
    first backend of ``auto_order`` that loads.
    """
    if backend == "auto" and structure is not None and op in _PROBLEMS:
        if not torch.compiler.is_compiling():          # the steady state: one dict lookup
            name = _CHOICES.get((op, device, dtype, structure, shape))
            if name is not None:
                return table[name]()
        order = _PROBLEMS[op].order(device)
        return table[choose(op, device, dtype, static(structure), static(shape), order)]()
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
