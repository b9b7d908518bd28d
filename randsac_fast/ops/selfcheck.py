"""Verified dispatch: ``auto`` uses a fast backend only after it matched the reference here.

The first time ``auto`` considers a fast backend (triton, cuda, ...) for a combination
(op, device, dtype, structure) — for attention the structure is head dim, inclusive/strict and
layout — it runs that backend once on a small random problem of the same structure, forward and
backward, next to the plain PyTorch implementation in the same dtype and in float64, and applies
the FlashAttention tolerance rule (:func:`close_by_rule`). The verdict is cached for the process.

``RANDSAC_FAST_SELFCHECK`` (or :func:`set_mode`) says what a mismatch does:

* ``warn`` (default): warn once with the numbers and fall back to the next backend;
* ``error``: raise :class:`SelfCheckFailed`;
* ``off``: no check (fast backends are trusted, as before this module existed).

The check is generic: an op provides a :class:`Case` factory (a small problem generator, see
:mod:`randsac_fast.ops.cases`) and names its reference backend; nothing here knows an op's
signature. It never draws from the global RNG (seeded local generators only), runs with autocast
off and gradients on, and runs eagerly: outside ``torch.compile`` it runs on the first call, under
``torch.compile`` at trace time (the dispatcher's choice is a trace-time constant), never inside a
graph. Its cost is one small problem per combination and is recorded in each :class:`Verdict`.
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

MODES = ("warn", "error", "off")
ENV = "RANDSAC_FAST_SELFCHECK"
FACTOR = 3.0          # the fast backend may be at most 3x worse than plain PyTorch in its dtype ...
FLOOR = 2e-5          # ... plus this, times max(1, |reference|): fp32 rounding of the FA2-style backward

_mode_override: str | None = None
ON_MODE_CHANGE: list[Callable[[], None]] = []     # the dispatcher's choice cache registers its reset


class SelfCheckFailed(RuntimeError):
    """A fast backend disagreed with the reference on this device (RANDSAC_FAST_SELFCHECK=error)."""


def mode() -> str:
    """The current mode: :func:`set_mode`'s value, else ``RANDSAC_FAST_SELFCHECK``, else ``warn``."""
    value = _mode_override or os.environ.get(ENV, "warn").strip().lower() or "warn"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r} is not a self-check mode; use one of {', '.join(MODES)}")
    return value


def set_mode(value: str | None) -> None:
    """Override ``RANDSAC_FAST_SELFCHECK`` for this process (None: read the variable again)."""
    global _mode_override
    if value is not None and value not in MODES:
        raise ValueError(f"self-check mode {value!r} is not one of {', '.join(MODES)}")
    _mode_override = value
    for forget in ON_MODE_CHANGE:     # choices made under the old mode no longer hold
        forget()


# --------------------------------------------------------------------------- the tolerance rule

def max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def close_by_rule(fast: Tensor, plain: Tensor, ref64: Tensor, *, factor: float = FACTOR,
                  floor: float = 1e-6) -> tuple[bool, float, float]:
    """FlashAttention's rule: ``|fast - ref64| <= factor * |plain - ref64| + floor`` (max norms),
    where ``plain`` is plain PyTorch in the same dtype as ``fast``. -> (ok, fast error, plain error).

    Non-finite fast values never pass; shapes must match.
    """
    if fast.shape != ref64.shape:
        return False, float("inf"), max_err(plain, ref64) if plain.shape == ref64.shape else float("inf")
    e_fast, e_plain = max_err(fast, ref64), max_err(plain, ref64)
    finite = bool(torch.isfinite(fast).all())
    return finite and e_fast <= factor * e_plain + floor, e_fast if finite else float("inf"), e_plain


# --------------------------------------------------------------------------- problems and verdicts

@dataclass(frozen=True)
class Case:
    """A small problem for one op. ``impl(*inputs)`` returns one tensor; ``grad_inputs`` are the
    positions of the inputs differentiated (their gradients are compared too; empty = forward only)."""
    inputs: tuple
    grad_inputs: tuple[int, ...] = ()
    outputs: tuple[str, ...] = ()          # names for the output and each gradient, for messages
    floor: float = FLOOR

    def names(self) -> tuple[str, ...]:
        if self.outputs:
            return self.outputs
        return ("out", *(f"grad[{i}]" for i in self.grad_inputs))


@dataclass
class Verdict:
    """The outcome of one self-check. ``status``: ``ok``, ``mismatch`` (numbers disagree),
    ``error`` (the backend raised something unexpected), ``unsupported`` (it declined the
    problem: dtype, head dim, device), ``off`` (not checked)."""
    op: str
    backend: str
    key: tuple
    status: str
    errors: dict = field(default_factory=dict)    # name -> {"fast": e, "plain": e, "bound": b, "ok": bool}
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "off")

    def summary(self) -> str:
        if self.status in ("ok", "mismatch"):
            bad = [f"{n} error {e['fast']:.2e} vs bound {e['bound']:.2e} (plain {e['plain']:.2e})"
                   for n, e in self.errors.items() if not e["ok"]]
            return "; ".join(bad) if bad else f"max error within {FACTOR:g}x plain PyTorch + floor"
        return self.detail

    def as_dict(self) -> dict:
        return {"op": self.op, "backend": self.backend, "key": [str(k) for k in self.key],
                "status": self.status, "errors": self.errors, "detail": self.detail, "seconds": self.seconds}


_VERDICTS: dict[tuple, Verdict] = {}
_WARNED: set[tuple] = set()
# Exceptions by which a backend declines a problem it does not take (wrong dtype, head dim, device).
_DECLINES = (TypeError, ValueError, NotImplementedError)


@contextlib.contextmanager
def _eager_numerics(device: torch.device):
    """Gradients on, autocast off, no inference mode: the check sees exactly the dtypes it built."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        yield


def _outputs(impl: Callable, case: Case, inputs: tuple, grad_seed: int = 7) -> list[Tensor]:
    """[out, *grads of out w.r.t. the grad inputs] for ``impl(*inputs)``."""
    out = impl(*inputs)
    if not case.grad_inputs:
        return [out.detach()]
    gen = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, [inputs[i] for i in case.grad_inputs], grad_out)
    return [out.detach(), *grads]


def _with_dtype(case: Case, dtype: torch.dtype | None) -> tuple:
    """Fresh leaves: floating tensors cast to ``dtype`` (None: as built), grad inputs requiring grad."""
    leaves = []
    for i, x in enumerate(case.inputs):
        if isinstance(x, Tensor) and x.is_floating_point():
            x = x.detach().to(dtype) if dtype is not None else x.detach().clone()
            if i in case.grad_inputs:
                x.requires_grad_()
        leaves.append(x)
    return tuple(leaves)


def compare(impl: Callable, plain: Callable, case: Case) -> dict:
    """Run ``impl`` and ``plain`` on the case in its dtype and ``plain`` in float64; the rule per output."""
    fast = _outputs(impl, case, _with_dtype(case, None))
    same = _outputs(plain, case, _with_dtype(case, None))
    ref = _outputs(plain, case, _with_dtype(case, torch.float64))
    errors = {}
    for name, f, p, r in zip(case.names(), fast, same, ref):
        floor = case.floor * max(1.0, r.abs().max().item() if r.numel() else 1.0)
        ok, e_fast, e_plain = close_by_rule(f, p, r, factor=FACTOR, floor=floor)
        errors[name] = {"fast": e_fast, "plain": e_plain, "bound": FACTOR * e_plain + floor, "ok": ok}
    return errors


def verify(op: str, backend: str, impl: Callable, plain: Callable, make_case: Callable[[], Case],
           key: tuple, device: torch.device) -> Verdict:
    """The cached verdict of ``backend`` for ``op`` at ``key``; computed once per process.

    Honours the mode: ``off`` returns an ``off`` verdict without running anything, ``error``
    raises :class:`SelfCheckFailed` on a mismatch or error, ``warn`` warns once per key.
    """
    current = mode()
    if current == "off":
        return Verdict(op, backend, key, "off")
    cache_key = (op, backend, key)
    verdict = _VERDICTS.get(cache_key)
    if verdict is None:
        t0 = time.perf_counter()
        try:
            with _eager_numerics(device):
                errors = compare(impl, plain, make_case())
            status = "ok" if all(e["ok"] for e in errors.values()) else "mismatch"
            verdict = Verdict(op, backend, key, status, errors)
        except _DECLINES as e:
            verdict = Verdict(op, backend, key, "unsupported", detail=f"{type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 — a crash on this device is a failed check, reported below
            verdict = Verdict(op, backend, key, "error", detail=f"{type(e).__name__}: {e}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        verdict.seconds = time.perf_counter() - t0
        _VERDICTS[cache_key] = verdict
    if verdict.status in ("mismatch", "error"):
        where = ", ".join(str(k) for k in key)
        text = (f"randsac_fast: self-check of {op} backend {backend!r} failed on ({where}): {verdict.summary()}")
        if current == "error":
            raise SelfCheckFailed(f"{text}. Unset {ENV} (or set it to 'warn') to fall back to the next backend "
                                  f"instead, or pick a backend explicitly")
        if cache_key not in _WARNED:
            _WARNED.add(cache_key)
            warnings.warn(f"{text}; falling back to the next backend. {ENV}=error raises instead, =off skips "
                          f"the check", RuntimeWarning, stacklevel=2)
    return verdict


def verdicts() -> list[Verdict]:
    """Every verdict of this process, in the order they were reached."""
    return list(_VERDICTS.values())


def clear() -> None:
    """Forget every verdict and warning (tests; a new device state)."""
    _VERDICTS.clear()
    _WARNED.clear()
