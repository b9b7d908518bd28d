"""Count the Triton compilations a run triggers, on any machine (the interpreter included).

With ``RANDSAC_FAST_COMPILE_LOG=path.jsonl`` set, every launch of a package kernel appends the key
Triton compiles it under to that file, once per distinct key and process:

    kernel name, num_warps, num_stages, the constexpr values, and per runtime argument its
    specialisation: a tensor's dtype and whether its address is 16-byte aligned, an integer's
    class (1 is folded into a constant, a multiple of 16 is marked divisible, else neither;
    ``do_not_specialize`` arguments: none of these), a float or a bool.

That is what Triton's own cache is keyed on, so on a GPU each new key is one compile (Triton's
disk cache under ``TRITON_CACHE_DIR`` makes it one per machine, not per process). Under the
interpreter nothing is compiled, but the keys are the same function of the launch: a dry run on
the CPU counts what the same launches would compile on a GPU (the interpreter's tile, like a
pinned tile, is one per kernel, dtype and head dim).

:func:`distinct` reads a log back; ``benchmarks/compile_budget.py`` turns the counts into a time
estimate for ``benchmarks/gpu_suite.sh``.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

ENV = "RANDSAC_FAST_COMPILE_LOG"
_seen: set[str] = set()


def _unspecialised(kernel, names: list[str]) -> set[str]:
    dns = getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
    return {names[x] if isinstance(x, int) else x for x in dns}


def _constexprs(fn) -> set[str]:
    out = set()
    for p in inspect.signature(fn).parameters.values():
        ann = p.annotation
        if ann is not inspect.Parameter.empty and "constexpr" in (ann if isinstance(ann, str) else repr(ann)):
            out.add(p.name)
    return out


def _spec(value, specialise: bool):
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return [str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0]
    if isinstance(value, (tuple, list)):
        return [_spec(v, specialise) for v in value]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        if not specialise:
            return "int"
        return "one" if value == 1 else ("div16" if value % 16 == 0 else "int")
    if isinstance(value, float):
        return "fp32"
    return type(value).__name__


def key(kernel, args: tuple, kwargs: dict) -> dict:
    """The compile key of one launch ``kernel[grid](*args, **kwargs)`` (see the module docstring)."""
    fn = kernel.fn
    while hasattr(fn, "fn"):          # heuristics / autotune wrappers
        fn = fn.fn
    names = list(inspect.signature(fn).parameters)
    bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    constexprs, unspecialised = _constexprs(fn), _unspecialised(kernel, names)
    return {
        "kernel": fn.__name__,
        "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3),
        "constexprs": {n: bound[n] for n in names if n in constexprs and n in bound},
        "args": {n: _spec(bound[n], n not in unspecialised) for n in names if n not in constexprs and n in bound},
    }


def instrument(module_globals: dict) -> None:
    """Record every launch of the Triton kernels defined in a module (when ``ENV`` is set)."""
    path = os.environ.get(ENV, "").strip()
    if not path:
        return
    for obj in list(module_globals.values()):
        if not (hasattr(obj, "run") and hasattr(obj, "fn") and hasattr(obj, "__getitem__")):
            continue
        if getattr(obj, "_randsac_logged", False) or obj.__class__.__name__ not in ("JITFunction", "InterpretedFunction"):
            continue
        run = obj.run

        def logged_run(*args, _run=run, _kernel=obj, **kwargs):
            launch = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            entry = json.dumps(key(_kernel, args, launch), sort_keys=True, default=str)
            if entry not in _seen:
                _seen.add(entry)
                with open(path, "a") as f:
                    f.write(entry + "\n")
            return _run(*args, **kwargs)

        obj.run = logged_run
        obj._randsac_logged = True


def distinct(*paths: str | os.PathLike) -> list[dict]:
    """The distinct keys recorded in the given logs (missing files count as empty), in first-seen order."""
    seen, out = set(), []
    for path in paths:
        path = Path(path)
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if line.strip() and line not in seen:
                seen.add(line)
                out.append(json.loads(line))
    return out
