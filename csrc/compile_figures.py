#!/usr/bin/env python
"""Compiler figures of the segment-attention kernels, without a GPU.

For each kernel instantiation (kernel, dtype, head dim, tile) and each of sm_80 / sm_90:
registers, spill bytes (ptxas -v), dynamic shared memory (the kernels' own smem layout structs,
printed by a host program built from the same sources), CTAs per SM (from registers and shared
memory: 4 warps per CTA) and the SASS instruction mix (cuobjdump -sass, static counts over the
whole kernel): HMMA (tensor-core mma), LDSM (ldmatrix), LDGSTS (cp.async), LDS / STS (other
shared-memory loads / stores), LDG / STG (global), SHFL.

    python csrc/compile_figures.py                       # the kernels in csrc/
    python csrc/compile_figures.py --src DIR             # another set of kernel sources (an older csrc/)
    python csrc/compile_figures.py --json figures.json   # also write the rows as JSON

Prints a Markdown table. NVCC / CUOBJDUMP / CXXFILT override the tools.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
NVCC = os.environ.get("NVCC", "nvcc")
CXXFILT = os.environ.get("CXXFILT", "c++filt")


def _cuobjdump() -> str:
    """cuobjdump from the environment, PATH, or the copy Triton ships with its NVIDIA backend."""
    if os.environ.get("CUOBJDUMP"):
        return os.environ["CUOBJDUMP"]
    if shutil.which("cuobjdump"):
        return "cuobjdump"
    try:
        import triton
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    raise SystemExit("cuobjdump not found: put the CUDA toolkit's bin on PATH or set CUOBJDUMP")


CUOBJDUMP = _cuobjdump()
# As the extension build compiles them (torch's flags: no implicit half / bf16 conversions).
FLAGS = ["-O3", "-std=c++17", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
ARCHS = (80, 90)
# Per-SM limits (CUDA occupancy tables): registers, shared memory usable by CTAs, max CTAs,
# max warps; each CTA also takes 1 KiB of shared memory reserved by the system.
SM_REGS = 65536
SM_SMEM = {80: 167936, 90: 233472}
SM_CTAS = 32
SM_WARPS = 64
CTA_SMEM_RESERVED = 1024
WARPS = 4
# Which smem layout struct belongs to a kernel (the kernel's second int template argument is
# the struct's second argument: keys or queries per inner tile).
SMEM_STRUCT = {"fwd_kernel": "FwdSmem", "dq_kernel": "DqSmem", "dkdv_kernel": "DkvSmem"}
OPCODES = ("HMMA", "LDSM", "LDGSTS", "LDS", "STS", "LDG", "STG", "SHFL")


def run(cmd: list[str], **kw) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stdout}{res.stderr}")
    return res.stdout + res.stderr


def demangle(names: list[str]) -> dict[str, str]:
    out = run([CXXFILT], input="\n".join(names)).splitlines()
    return dict(zip(names, out))


def parse_ptxas(log: str) -> dict[str, dict]:
    """ptxas -v -> {mangled name: {regs, spill_st, spill_ld, static_smem}}."""
    stats, name = {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m.group(1)
            stats[name] = {"regs": 0, "spill_st": 0, "spill_ld": 0, "static_smem": 0}
        elif name and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            stats[name]["spill_st"], stats[name]["spill_ld"] = int(m.group(1)), int(m.group(2))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            stats[name]["regs"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                stats[name]["static_smem"] = int(s.group(1))
    return stats


def parse_sass(sass: str) -> dict[str, Counter]:
    """cuobjdump -sass -> {mangled name: opcode counts}."""
    counts, name = {}, None
    for line in sass.splitlines():
        if m := re.search(r"Function : (\w+)", line):
            name = m.group(1)
            counts[name] = Counter()
        elif name and (m := re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)):
            counts[name][m.group(1)] += 1
    return counts


def compile_arch(src: Path, arch: int, tmp: Path) -> tuple[dict, dict]:
    cubin = tmp / f"{src.stem}.{arch}.cubin"
    log = run([NVCC, *FLAGS, f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", f"-I{src.parent}", f"-I{HERE}",
               str(src), "-o", str(cubin)])
    return parse_ptxas(log), parse_sass(run([CUOBJDUMP, "-sass", str(cubin)]))


def kernel_key(demangled: str) -> tuple[str, str, list[int]]:
    """'void segattn::fwd_kernel<__half, 64, 64>(...)' -> ('fwd_kernel', 'fp16', [64, 64])."""
    m = re.search(r"segattn::(\w+)<([^>]*)>", demangled)
    args = [a.strip() for a in m.group(2).split(",")]
    dtype = {"__half": "fp16", "__nv_bfloat16": "bf16"}[args[0]]
    ints = [int(a) for a in args[1:] if re.fullmatch(r"-?\d+", a)]
    return m.group(1), dtype, ints


def smem_bytes(sources: list[Path], keys: set[tuple[str, int, int]], tmp: Path) -> dict[tuple[str, int, int], int]:
    """Dynamic shared memory per (kernel, D, tile): the kernels' layout structs, printed by a host
    program that includes the kernel sources (nothing runs on a GPU)."""
    prog = tmp / "smem_sizes.cu"
    lines = [f'#include "{s}"' for s in sources] + ["#include <cstdio>", "int main() {"]
    for kernel, d, tile in sorted(keys):
        lines.append(f'  std::printf("{kernel} {d} {tile} %d\\n", (int)segattn::{SMEM_STRUCT[kernel]}<{d}, {tile}>::bytes);')
    lines.append("  return 0;\n}")
    prog.write_text("\n".join(lines) + "\n")
    exe = tmp / "smem_sizes"
    run([NVCC, *FLAGS, "-arch=sm_80", f"-I{HERE}", str(prog), "-o", str(exe)])
    out = {}
    for line in run([str(exe)]).splitlines():
        kernel, d, tile, nbytes = line.split()
        out[(kernel, int(d), int(tile))] = int(nbytes)
    return out


def ctas_per_sm(regs: int, smem: int, arch: int) -> tuple[int, str]:
    """-> (CTAs of 4 warps per SM, the limiting resource)."""
    per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
    by_regs = min(SM_WARPS, SM_REGS // per_warp) // WARPS
    by_smem = SM_SMEM[arch] // (smem + CTA_SMEM_RESERVED)
    by_warps = SM_WARPS // WARPS
    best = min(by_regs, by_smem, by_warps, SM_CTAS)
    limit = "regs" if best == by_regs else "smem" if best == by_smem else "warps"
    return best, limit


def figures(src_dir: Path) -> list[dict]:
    sources = sorted(src_dir.resolve().glob("segattn_*.cu"))
    if not sources:
        raise SystemExit(f"no segattn_*.cu in {src_dir}")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        with ThreadPoolExecutor(max_workers=2) as pool:
            jobs = {(s, a): pool.submit(compile_arch, s, a, tmp) for s in sources for a in ARCHS}
            results = {k: j.result() for k, j in jobs.items()}
        names = sorted({n for ptxas, _ in results.values() for n in ptxas})
        pretty = demangle(names)
        keys = set()
        for n in names:
            kernel, _, ints = kernel_key(pretty[n])
            keys.add((kernel, ints[0], ints[1]))
        smem = smem_bytes(sources, keys, tmp)
    rows = []
    for (src, arch), (ptxas, sass) in results.items():
        for name, st in ptxas.items():
            kernel, dtype, ints = kernel_key(pretty[name])
            dyn = smem[(kernel, ints[0], ints[1])]
            ctas, limit = ctas_per_sm(st["regs"], dyn + st["static_smem"], arch)
            ops = sass.get(name, Counter())
            rows.append({"kernel": kernel, "dtype": dtype, "head_dim": ints[0], "tile": ints[1],
                         "template": pretty[name].split("(")[0].replace("void ", ""), "arch": f"sm_{arch}",
                         "regs": st["regs"], "spill_bytes": st["spill_st"] + st["spill_ld"],
                         "smem_bytes": dyn + st["static_smem"], "ctas_per_sm": ctas, "cta_limit": limit,
                         **{op: ops.get(op, 0) for op in OPCODES}})
    order = {"fwd_kernel": 0, "dkdv_kernel": 1, "dq_kernel": 2}
    rows.sort(key=lambda r: (order.get(r["kernel"], 9), r["head_dim"], r["dtype"], r["arch"]))
    return rows


def markdown(rows: list[dict]) -> str:
    head = ["kernel", "dtype", "D", "tile", "arch", "regs", "spill B", "smem B", "CTAs/SM", *OPCODES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(x) for x in (
            r["kernel"], r["dtype"], r["head_dim"], r["tile"], r["arch"], r["regs"], r["spill_bytes"], r["smem_bytes"],
            f"{r['ctas_per_sm']} ({r['cta_limit']})", *(r[op] for op in OPCODES))) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=HERE, help="directory of the kernel sources (segattn_*.cu)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = figures(args.src)
    print(run([NVCC, "--version"]).strip().splitlines()[-1])
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
