"""The CUDA extension's kernels (``csrc/*.cu``) built for the CPU emulation (``csrc/emu/``), so that
they run — and are tested — on a machine without a GPU.

The kernel sources are compiled unchanged by the host C++ compiler (``-x c++``) with the emulation
header force-included and the CUDA toolkit's own ``cuda_fp16.h`` / ``cuda_bf16.h`` in host mode, so
the toolkit must be installed (its headers, not a GPU). Two builds:

* :func:`build_extension`: the torch binding (``csrc/binding.cpp``, with ``-DSEGATTN_EMU``: CPU
  tensors, no stream) as a Python module through ``torch.utils.cpp_extension.load``. The ``cuda``
  backend uses it in place of the real extension when ``RANDSAC_FAST_CUDA_EMU=1``
  (:func:`randsac_fast.kernels.cuda_ext.load`); test use only.
* :func:`build_program`: a standalone program (``csrc/emu/driver.cpp`` or any other ``main``),
  optionally under AddressSanitizer / UBSan / ThreadSanitizer, for what cannot run inside Python.

Builds are cached under ``~/.cache/randsac_fast/cuda_emu`` (``RANDSAC_FAST_EMU_CACHE``), keyed by
the sources' contents and the flags.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

#: The kernel sources (as in cuda_ext, which imports this module lazily: no import cycle).
CSRC = Path(__file__).resolve().parents[2] / "csrc"

EMU = CSRC / "emu"

#: What torch's extension build defines for CUDA sources: the kernels must not rely on implicit
#: half / bf16 conversions, in the emulation either.
TORCH_CUDA_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]

#: Compiler flags of each sanitizer build.
SANITIZERS = {
    None: [],
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
    "thread": ["-fsanitize=thread"],
}


class EmulationUnavailable(RuntimeError):
    """The emulated build cannot be made here (the message says what is missing)."""


def _cxx() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise EmulationUnavailable("no C++ compiler (g++) found; set CXX")
    return cxx


def cuda_include_dir() -> Path:
    """The CUDA toolkit's include directory (the one holding ``cuda_fp16.h``): from ``CUDA_HOME`` /
    ``CUDA_PATH``, else from where nvcc says it looks (``nvcc --dryrun``), else ``/usr/local/cuda``."""
    candidates: list[Path] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            root = Path(os.environ[var])
            candidates += [root / "include", root / "targets" / "x86_64-linux" / "include"]
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    if nvcc and os.path.exists(nvcc):
        try:  # nvcc may be a wrapper script: ask it where its headers are
            res = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                                 timeout=60)
            for m in re.finditer(r'INCLUDES="([^"]*)"', res.stdout + res.stderr):
                candidates += [Path(p[2:]) for p in m.group(1).split() if p.startswith("-I")]
        except (OSError, subprocess.SubprocessError):
            pass
        real = Path(os.path.realpath(nvcc)).parent.parent
        candidates += [real / "include", real / "targets" / "x86_64-linux" / "include"]
    candidates += [Path("/usr/local/cuda/include")]
    for c in candidates:
        if (c / "cuda_fp16.h").is_file() and (c / "cuda_bf16.h").is_file() and (c / "cuda_runtime.h").is_file():
            return c.resolve()
    raise EmulationUnavailable("the CUDA toolkit's headers (cuda_fp16.h, cuda_bf16.h, cuda_runtime.h) were not "
                               "found: install the CUDA toolkit (nvcc) or set CUDA_HOME")


def kernel_sources(csrc: Path = CSRC) -> list[Path]:
    """The kernel files the extension builds (the same list as :func:`cuda_ext.sources`)."""
    return sorted(Path(csrc).glob("*.cu"))


def compile_flags(csrc: Path = CSRC, opt: str = "-O2") -> list[str]:
    """Flags of every emulated translation unit (kernels, runtime, binding, programs)."""
    csrc = Path(csrc)
    return ["-std=c++17", opt, "-g", "-DSEGATTN_EMU", *TORCH_CUDA_DEFINES, f"-I{csrc}",
            f"-I{EMU}", f"-I{cuda_include_dir()}"]


def cache_dir() -> Path:
    root = Path(os.environ.get("RANDSAC_FAST_EMU_CACHE", Path.home() / ".cache" / "randsac_fast" / "cuda_emu"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _digest(files, extra: list[str]) -> str:
    h = hashlib.sha256()
    for f in sorted({Path(f).resolve() for f in files}):
        h.update(str(f).encode())
        h.update(f.read_bytes())
    h.update("\0".join(extra).encode())
    return h.hexdigest()[:16]


def _header_files(csrc: Path) -> list[Path]:
    return [p for pat in ("*.cuh", "*.h") for p in Path(csrc).glob(pat)] + \
        [p for p in EMU.rglob("*") if p.suffix in (".h", ".cpp")]


def _compile(cxx: str, src: Path, flags: list[str], headers: list[Path]) -> Path:
    """One translation unit -> its cached object file (a kernel file with the emulation header
    force-included)."""
    lang = ["-include", str(EMU / "cuda_emu.h"), "-x", "c++"] if src.suffix == ".cu" else []
    cmd = [cxx, *flags, *lang, "-c"]
    obj_dir = cache_dir() / "objects"
    obj_dir.mkdir(exist_ok=True)
    obj = obj_dir / f"{src.stem}-{_digest([src, *headers], cmd)}.o"
    if not obj.is_file():
        tmp = obj.with_suffix(f".{os.getpid()}.tmp")
        res = subprocess.run([*cmd, str(src), "-o", str(tmp)], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"emulated build of {src} failed:\n{res.stdout}{res.stderr}")
        tmp.replace(obj)
    return obj


def build_program(main: Path = EMU / "driver.cpp", *, csrc: Path = CSRC, sanitize: str | None = None,
                  opt: str = "-O2", kernels: list[Path] | None = None) -> Path:
    """Compile the kernels (``kernels``, default every ``csrc/*.cu``) + the emulation runtime + ``main``
    into a program; returns its path. ``sanitize``: None, "address" (ASan + UBSan) or "thread" (TSan;
    the program then runs every CUDA thread as an OS thread). Objects are cached one by one, so a
    build that changes one kernel file recompiles only that file."""
    from concurrent.futures import ThreadPoolExecutor

    csrc = Path(csrc)
    kernels = kernel_sources(csrc) if kernels is None else [Path(k) for k in kernels]
    flags = compile_flags(csrc, opt) + SANITIZERS[sanitize]
    cxx = _cxx()
    headers = _header_files(csrc)
    units = [*kernels, EMU / "emu_runtime.cpp", Path(main)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        objs = list(pool.map(lambda src: _compile(cxx, src, flags, headers), units))
    exe_dir = cache_dir() / "programs"
    exe_dir.mkdir(exist_ok=True)
    exe = exe_dir / f"{Path(main).stem}-{sanitize or 'plain'}-{_digest(objs, [cxx])}"
    if not exe.is_file():
        tmp = exe.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([cxx, *SANITIZERS[sanitize], *map(str, objs), "-o", str(tmp), "-lpthread"], check=True,
                       capture_output=True, text=True)
        tmp.replace(exe)
    return exe


_extension = None


def build_extension(verbose: bool = False):
    """The torch binding over the emulated kernels, as a Python module (``forward``, ``backward``, ...,
    ``EMULATED = True``) taking CPU tensors. Compiled on first use (ninja keeps it up to date in ``cache_dir()``)."""
    global _extension
    if _extension is not None:
        return _extension
    from torch.utils import cpp_extension

    flags = compile_flags()
    # One build directory and module name: ninja then recompiles only what changed (the binding
    # against torch's headers is the slow part).
    build_dir = cache_dir() / "torch-ext"
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch builds *.cu with nvcc: each kernel file goes in as a C++ unit that includes it unchanged
    # after the emulation header (what -include does for build_program).
    wrappers = []
    for cu in kernel_sources():
        w = build_dir / f"{cu.stem}_emu.cpp"
        text = f'#include "cuda_emu.h"\n#include "{cu}"\n'
        if not w.is_file() or w.read_text() != text:
            w.write_text(text)
        wrappers.append(str(w))
    os.environ.setdefault("MAX_JOBS", "2")
    _extension = cpp_extension.load(
        name="randsac_fast_C_emu", sources=wrappers + [str(EMU / "emu_runtime.cpp"), str(CSRC / "binding.cpp")],
        extra_cflags=flags[1:], build_directory=str(build_dir), verbose=verbose)
    return _extension
