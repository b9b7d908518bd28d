"""randsac_fast: fast RandSAC / SAIM autoregressive-order pre-training for Vision Transformers.

The package's face: ``orders`` (the segment-order contract and its samplers), ``ops`` (the fast
public ops), ``reference`` (the dense reference), ``models``, ``data``, ``config``, ``train``,
``eval``, ``interop`` and ``viz``. The heavier ones are imported on first use, so
``import randsac_fast`` stays cheap and ``randsac_fast.interop`` just works.
"""
import importlib
import os as _os
import signal as _signal
import sys as _sys


def _command_start() -> bool:
    """Is this process starting one of the package's commands (``python -m randsac_fast.X``,
    torchrun's workers, a ``randsac-*`` console script) rather than being imported by a program?"""
    argv = list(getattr(_sys, "orig_argv", []))
    if "-m" in argv:
        i = argv.index("-m")
        return i + 1 < len(argv) and argv[i + 1].startswith("randsac_fast")
    return _os.path.basename(_sys.argv[0] if _sys.argv else "").startswith("randsac-")


def _interrupted_start(signum, frame):
    print("interrupted while starting (importing torch); nothing was written", file=_sys.stderr, flush=True)
    raise SystemExit(130)


def started() -> None:
    """Called first by every command's ``main``: from here on Ctrl-C is the command's to handle."""
    if _signal.getsignal(_signal.SIGINT) is _interrupted_start:
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)


# Ctrl-C during a command's start-up (seconds of imports) ends it with one line and exit code 130,
# not a traceback through the import machinery; a program importing the package is left alone.
if _command_start() and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    _signal.signal(_signal.SIGINT, _interrupted_start)

from . import ops, orders, reference  # noqa: E402
from .orders import SegmentOrder  # noqa: E402

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
