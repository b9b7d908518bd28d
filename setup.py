"""Build script: the metadata lives in pyproject.toml; this adds the optional CUDA extension.

``randsac_fast._C`` (csrc/) is built only when a CUDA build of torch and a CUDA toolkit (nvcc) are
both importable/findable — i.e. with ``pip install -e . --no-build-isolation`` on a CUDA machine.
Everywhere else (CPU machines, isolated builds that cannot see torch) the pure Python package is
installed and the ``cuda`` backend reports how to build the extension. TORCH_CUDA_ARCH_LIST picks
the GPU architectures (default 8.0;9.0).
"""
import os
import runpy
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def cuda_extension():
    """-> (ext_modules, cmdclass): the extension when it can be built here, else nothing."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("randsac_fast: no CUDA build of torch or no CUDA toolkit; skipping the CUDA extension")
        return [], {}
    # The loader owns the source list and flags (exec'd by path: the package is not importable yet).
    ext = runpy.run_path(str(ROOT / "randsac_fast" / "kernels" / "cuda_ext.py"))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ext["DEFAULT_ARCH_LIST"])
    module = CUDAExtension(
        name="randsac_fast._C",
        sources=[os.path.relpath(s, ROOT) for s in ext["sources"](ROOT / "csrc")],
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ext["CXX_FLAGS"], "nvcc": ext["NVCC_FLAGS"]},
    )
    return [module], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
