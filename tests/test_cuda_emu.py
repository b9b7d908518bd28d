"""The CUDA extension's kernels executed on the CPU (csrc/emu/: the sources compiled unchanged by the
host compiler, each CUDA thread a CPU execution context; see randsac_fast.kernels.cuda_emu).

* The PTX primitives of csrc/ptx.cuh against a plain GEMM / transpose / copy contract.
* Forward and backward through the `cuda` backend's Python wrapper against the float64 reference
  (FlashAttention rule), on the case grid of test_attention_cuda.py (child process:
  tests/cuda_emu_parity.py).
* AddressSanitizer + UBSan on a few cases and ThreadSanitizer on a small one (standalone program
  csrc/emu/driver.cpp), and mutated kernel sources showing that those checks bite: a removed
  __syncthreads, a removed bounds check, a removed cp.async wait.

Needs g++ and the CUDA toolkit's headers (not a GPU); without them the tests skip saying what is
missing, unless RANDSAC_FAST_REQUIRE_EMU=1 (CI), which turns that into a failure.
"""
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_close_by_rule
from randsac_fast import reference
from randsac_fast.kernels import cuda_emu
from test_attention_cuda import _segs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def toolchain():
    try:
        cuda_emu.cuda_include_dir()
        cuda_emu._cxx()
    except cuda_emu.EmulationUnavailable as e:
        if os.environ.get("RANDSAC_FAST_REQUIRE_EMU", "0") not in ("", "0"):
            pytest.fail(f"RANDSAC_FAST_REQUIRE_EMU=1 but the emulated build cannot be made: {e}")
        pytest.skip(f"the CUDA emulation needs {e}")


# --------------------------------------------------------------------------------------------
# PTX primitives
# --------------------------------------------------------------------------------------------
PTX_CHECKS = 14


def test_ptx_primitives_match_plain_gemm_and_transpose():
    exe = cuda_emu.build_program(cuda_emu.EMU / "ptx_selftest.cpp", kernels=[])
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    lines = res.stdout.splitlines()
    failed = [line for line in lines if not line.startswith("PASS ")]
    assert res.returncode == 0 and not failed, res.stdout + res.stderr
    assert len(lines) == PTX_CHECKS, res.stdout


def test_ptx_selftest_catches_a_wrong_fragment_layout(tmp_path):
    """The self-test bites: an emulation whose mma reads a[1] where a[2] belongs fails it."""
    src = (cuda_emu.EMU / "ptx_emu.h").read_text()
    bad = src.replace("const int src = (k % 8) / 2, reg_k = k >= 8 ? 2 : 0;",
                      "const int src = (k % 8) / 2, reg_k = k >= 8 ? 1 : 0;")
    assert bad != src
    # A copy of the emulation directory with the mutated header, shadowing the real one.
    emu = tmp_path / "emu"
    emu.mkdir()
    (emu / "ptx_emu.h").write_text(bad)
    test = tmp_path / "ptx_selftest.cpp"
    test.write_text(f'#include "{emu / "ptx_emu.h"}"\n' + (cuda_emu.EMU / "ptx_selftest.cpp").read_text())
    exe = cuda_emu.build_program(test, kernels=[])
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert re.search(r"FAIL mma_m16n8k16<f16> \(PTX-table fragments\)", res.stdout), res.stdout


# --------------------------------------------------------------------------------------------
# Forward / backward through the Python binding (child process)
# --------------------------------------------------------------------------------------------
def test_kernels_match_float64_reference_through_the_cuda_backend():
    env = {**os.environ, "RANDSAC_FAST_CUDA_EMU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "cuda_emu_parity.py")], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=900)
    print("\n".join(line for line in res.stdout.splitlines() if line.startswith("EMU-TIME")))
    assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-4000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout, res.stdout[-2000:]


# --------------------------------------------------------------------------------------------
# The standalone driver: sanitizers and mutated sources
# --------------------------------------------------------------------------------------------
def _problem(case: str, inclusive: bool, dtype, dim: int, heads: int = 1, batch: int | None = None):
    seg_q, seg_k = _segs(case, torch.Generator().manual_seed(1))
    if batch is not None:
        seg_q, seg_k = seg_q[:batch].contiguous(), seg_k[:batch].contiguous()
    gen = torch.Generator().manual_seed(2)
    b, nq, nk = seg_q.shape[0], seg_q.shape[1], seg_k.shape[1]
    q, k, v, do = (torch.randn(b, heads, n, dim, generator=gen, dtype=torch.float64).to(dtype)
                   for n in (nq, nk, nk, nq))
    return dict(q=q, k=k, v=v, do=do, seg_q=seg_q, seg_k=seg_k, inclusive=inclusive, scale=dim ** -0.5)


def _run_driver(exe: Path, pr: dict, tmp_path: Path, env=None):
    """-> (CompletedProcess, outputs dict or None)."""
    q, k, v, do = pr["q"], pr["k"], pr["v"], pr["do"]
    b, h, nq, d = q.shape
    nk = k.shape[2]
    bf16 = int(q.dtype == torch.bfloat16)
    raw = b"".join(t.contiguous().view(torch.int16).numpy().tobytes() for t in (q, k, v, do))
    blob = struct.pack("8i", b, h, nq, nk, d, bf16, int(pr["inclusive"]), 1) + struct.pack("f", pr["scale"]) + raw + \
        pr["seg_q"].contiguous().numpy().tobytes() + pr["seg_k"].contiguous().numpy().tobytes()
    inp, out = tmp_path / "in.bin", tmp_path / "out.bin"
    inp.write_bytes(blob)
    res = subprocess.run([str(exe), str(inp), str(out)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **(env or {})})
    if res.returncode != 0:
        return res, None
    data = bytearray(out.read_bytes())
    outs, at = {}, 0
    for name, shape, dt in (("out", q.shape, q.dtype), ("lse", q.shape[:3], torch.float32), ("dq", q.shape, q.dtype),
                            ("dk", k.shape, q.dtype), ("dv", v.shape, q.dtype)):
        n = int(torch.Size(shape).numel()) * (4 if dt == torch.float32 else 2)
        raw_t = torch.frombuffer(data[at: at + n], dtype=torch.float32 if dt == torch.float32 else torch.int16)
        outs[name] = (raw_t if dt == torch.float32 else raw_t.view(dt)).view(shape)
        at += n
    assert at == len(data)
    return res, outs


def _check_against_reference(pr: dict, outs: dict, what: str):
    def run(dt):
        q, k, v = (pr[n].to(dt).requires_grad_() for n in ("q", "k", "v"))
        o = reference.segment_attention(q, k, v, pr["seg_q"], pr["seg_k"], inclusive=pr["inclusive"],
                                        scale=pr["scale"])
        return (o.detach(), *torch.autograd.grad(o, (q, k, v), pr["do"].to(dt)))
    ref64, plain = run(torch.float64), run(pr["q"].dtype)
    for name, p, r in zip(("out", "dq", "dk", "dv"), plain, ref64):
        assert_close_by_rule(outs[name], p, r, factor=3.0, floor=1e-5, what=f"{what}: {name} vs float64")


SANITIZER_REPORT = re.compile(r"ERROR: AddressSanitizer|runtime error:|WARNING: ThreadSanitizer")

ASAN_CASES = [("square-10x10", True, torch.float16, 64), ("blob-padded", False, torch.bfloat16, 128),
              ("hier-shifted", False, torch.float16, 32)]


@pytest.mark.slow
def test_asan_ubsan_clean(tmp_path):
    exe = cuda_emu.build_program(sanitize="address")
    for case, inclusive, dtype, dim in ASAN_CASES:
        pr = _problem(case, inclusive, dtype, dim)
        res, outs = _run_driver(exe, pr, tmp_path)
        assert res.returncode == 0 and not SANITIZER_REPORT.search(res.stderr), res.stderr[-6000:]
        _check_against_reference(pr, outs, f"ASan {case} d{dim}")


@pytest.mark.slow
def test_tsan_clean_on_real_threads(tmp_path):
    exe = cuda_emu.build_program(sanitize="thread")
    pr = _problem("keys-trimmed", True, torch.bfloat16, 32, batch=1)
    res, outs = _run_driver(exe, pr, tmp_path, env={"TSAN_OPTIONS": "halt_on_error=1"})
    assert res.returncode == 0 and not SANITIZER_REPORT.search(res.stderr), res.stderr[-6000:]
    _check_against_reference(pr, outs, "TSan")


def _mutated_kernel(tmp_path: Path, name: str, old: str, new: str) -> list[Path]:
    """The kernel list with csrc/<name> replaced by a copy in which `old` (must occur once) is `new`."""
    src = cuda_emu.CSRC / name
    text = src.read_text()
    assert text.count(old) == 1, f"mutation target not found once in {name}: {old!r}"
    mutated = tmp_path / name
    mutated.write_text(f"// mutated copy of csrc/{name}\n" + text.replace(old, new))
    # Includes resolve to csrc/ (the copy's own directory has nothing else).
    return [mutated if k.name == name else k for k in cuda_emu.kernel_sources()]


@pytest.mark.slow
def test_mutation_missing_syncthreads_gives_wrong_output(tmp_path):
    """Without the barrier after the cp.async wait, a warp reads K / V chunks other warps' copies
    have not landed yet (0xFF: NaN): the output is wrong. (Under TSan, a race.)"""
    kernels = _mutated_kernel(tmp_path, "segattn_fwd.cu",
                              "    __syncthreads();  // tile j has landed for all threads", "    // (removed)")
    exe = cuda_emu.build_program(kernels=kernels)
    pr = _problem("square-10x10", True, torch.float16, 64)
    res, outs = _run_driver(exe, pr, tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    with pytest.raises(AssertionError, match="non-finite|error"):
        _check_against_reference(pr, outs, "mutated")


@pytest.mark.slow
def test_mutation_missing_cp_async_wait_reads_poison(tmp_path):
    kernels = _mutated_kernel(tmp_path, "segattn_fwd.cu", "    ptx::cp_async_wait<0>();\n    __syncthreads();",
                              "    __syncthreads();")
    exe = cuda_emu.build_program(kernels=kernels)
    pr = _problem("square-10x10", True, torch.bfloat16, 32)
    res, outs = _run_driver(exe, pr, tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert not torch.isfinite(outs["out"]).all()  # the tiles never landed: NaN
    with pytest.raises(AssertionError, match="non-finite"):
        _check_against_reference(pr, outs, "mutated")


@pytest.mark.slow
def test_mutation_missing_bounds_check_is_an_asan_overflow(tmp_path):
    """Without `row < nq`, the tail tile writes lse past the end of its buffer."""
    kernels = _mutated_kernel(tmp_path, "segattn_fwd.cu", "if (lane % 4 == 0 && row < p.nq)", "if (lane % 4 == 0)")
    exe = cuda_emu.build_program(kernels=kernels, sanitize="address")
    pr = _problem("square-10x10", True, torch.float16, 64, batch=1)   # 100 rows: a tail tile, last head
    res, _ = _run_driver(exe, pr, tmp_path)
    assert res.returncode != 0 and "heap-buffer-overflow" in res.stderr, res.stderr[-4000:]
