"""Loader of the compiled CUDA extension ``randsac_fast._C`` (the segment-attention kernels in
``csrc/``).

:func:`load` returns, in this order: the kernels built for the CPU emulation when
``RANDSAC_FAST_CUDA_EMU=1`` (tests, :mod:`randsac_fast.kernels.cuda_emu`); the prebuilt module
(``pip install -e . --no-build-isolation`` on a machine with nvcc and a CUDA build of torch); a JIT build (:func:`build_jit`, via
``torch.utils.cpp_extension.load``) when ``RANDSAC_FAST_JIT=1``; otherwise it raises ImportError
saying how to build it. ``setup.py`` takes the source list and flags from here, so the two builds
cannot drift apart.
"""
from __future__ import annotations

import os
from pathlib import Path

#: The sources live next to the package in a source checkout (editable installs, JIT builds).
CSRC = Path(__file__).resolve().parents[2] / "csrc"

#: Compiler flags of both builds. The kernels need sm_80+ (bf16 mma.sync, cp.async).
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]
DEFAULT_ARCH_LIST = "8.0;9.0"

BUILD_HINT = ("build it with `pip install -e . --no-build-isolation` on a machine with CUDA (nvcc and a CUDA "
              "build of torch), or set RANDSAC_FAST_JIT=1 to compile it on first use")

_module = None


def sources(csrc: Path = CSRC) -> list[str]:
    """The extension's sources: every kernel file (``*.cu``) plus the torch binding."""
    csrc = Path(csrc)
    return sorted(str(p) for p in csrc.glob("*.cu")) + [str(csrc / "binding.cpp")]


def _jit_requested() -> bool:
    return os.environ.get("RANDSAC_FAST_JIT", "0") not in ("", "0")


def load():
    """Return the extension module (``forward``, ``backward``); ImportError with the fix if missing."""
    global _module
    if _module is not None:
        return _module
    if os.environ.get("RANDSAC_FAST_CUDA_EMU", "0") not in ("", "0"):
        # Tests without a GPU: the same kernels and binding built for the CPU emulation (cuda_emu).
        from . import cuda_emu
        _module = cuda_emu.build_extension()
        return _module
    try:
        from randsac_fast import _C
    except ImportError as e:
        if _jit_requested():
            return build_jit()
        raise ImportError(f"the CUDA extension randsac_fast._C is not available ({e}); {BUILD_HINT}") from e
    _module = _C
    return _module


def build_jit(verbose: bool = False):
    """Compile the extension now with ``torch.utils.cpp_extension.load`` (cached in torch's
    extension directory) and return it. Needs nvcc, a CUDA build of torch and a source checkout."""
    global _module
    import torch
    from torch.utils import cpp_extension

    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is a CPU build")
    if cpp_extension.CUDA_HOME is None:
        missing.append("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    if not (CSRC / "binding.cpp").is_file():
        missing.append(f"the sources are not in {CSRC} (install from a source checkout)")
    if missing:
        raise ImportError(f"cannot JIT-build the CUDA extension randsac_fast._C: {'; '.join(missing)}. "
                          f"Run it on a machine with CUDA, or {BUILD_HINT}")
    _module = cpp_extension.load(name="randsac_fast_C", sources=sources(), extra_include_paths=[str(CSRC)],
                                 extra_cflags=CXX_FLAGS, extra_cuda_cflags=NVCC_FLAGS, verbose=verbose)
    return _module
