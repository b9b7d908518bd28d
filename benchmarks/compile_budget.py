"""How many Triton compilations each step of gpu_suite.sh triggers, and what they cost on sm_90.

    python benchmarks/compile_budget.py OUT info attention targets ...   # after a dry run
    python benchmarks/compile_budget.py --measure                        # refresh compile_costs.json

The dry run of ``gpu_suite.sh`` runs each step with ``RANDSAC_FAST_COMPILE_LOG=OUT/compiles_<step>.jsonl``
(see :mod:`randsac_fast.kernels.compile_log`): the distinct compile keys its launches produce. A
key compiled by an earlier step is not compiled again (Triton's disk cache, shared by the steps),
so each step is charged its new keys only. The GPU test subset (``pytest -m gpu``) cannot run on
a CPU; its keys are declared in ``GPU_TESTS`` below from the tests' parametrisations, and the
dry run fails if a collected GPU test has no entry there.

Cost per compile: the median sm_90 compile time (ptxas included) of the pinned variants of each
kernel family, measured on this machine by ``--measure`` through ``kernels.compile_check``
(``compile_costs.json``, with its provenance). Not counted: torch.compile / inductor graphs
(FlexAttention rows, compiled training rows) and the CUDA extension build: those steps are bounded
by their own time limits.
"""
from __future__ import annotations

import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
COSTS = HERE / "compile_costs.json"
BUDGET_S = 480

# GPU-only tests -> (kernel family, new compile keys) they add: dtypes x head dims x kernels.
_ATTN = 4   # fwd, delta, dK/dV, dQ
GPU_TESTS = {
    "test_gpu_half_precision_vit_shapes": [("attention", 2 * 2 * _ATTN)],     # bf16, fp16 x D 64, 128
    "test_gpu_bf16_edge_cases": [],                                          # bf16 D=64: keys above
    "test_cuda_matches_reference_and_triton": [],                            # fp16, bf16 x D 64, 128: above
    "test_cuda_strided_inputs_head_dim_32": [("attention", 2 * 2 * _ATTN)],   # fp16, bf16 x aligned, offset 1
    "test_cuda_backward_is_deterministic": [],
    "test_cuda_opcheck_and_compile": [],
    "test_cuda_fused_layouts": [],                                           # the CUDA extension only
    "test_targets_and_loss_bf16": [("targets", 2 * 5)],                      # k 0, 9 x targets, mse/l1 fwd, bwd
    "test_skip_memory_bf16": [("skip_memory", 2)],
    "test_flex_gpu": [],                                                     # inductor, not counted
    "test_xformers_gpu": [],
    "test_hidden_keys_change_nothing": [],                                   # cuda / xformers params
    "test_device_argument_cuda": [],
}


def family(kernel: str) -> str:
    if kernel.startswith("skip"):
        return "skip_memory"
    if kernel.startswith("patch"):
        return "targets"
    return "attention"


def measure() -> dict:
    """Compile the pinned variants for sm_90 here, one at a time; median seconds per family."""
    import os
    import tempfile
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="randsac_compile_budget_")
    sys.path.insert(0, str(HERE.parent))
    from randsac_fast.kernels import compile_check as cc
    import triton
    variants = cc._attention_variants(False) + cc._skip_variants() + cc._targets_variants()
    seconds: dict[str, list[float]] = {}
    for v in variants:
        r = cc.compile_variant(v)
        if r["error"] is None:
            seconds.setdefault(family(v.kernel), []).append(r["seconds"])
    return {"seconds_per_compile": {k: round(statistics.median(v), 2) for k, v in seconds.items()},
            "variants": {k: len(v) for k, v in seconds.items()},
            "how": "median sm_90 compile (ptxas included) of compile_check's default variants, one process, "
                   "fresh Triton cache",
            "host": platform.processor() or platform.machine(), "python": platform.python_version(),
            "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def budget(out: Path, steps: list[str], gpu_tests: list[str]) -> tuple[list[dict], float]:
    """Rows (step, new compiles per family, estimate s) and the total estimate."""
    sys.path.insert(0, str(HERE.parent))
    from randsac_fast.kernels.compile_log import distinct
    costs = json.loads(COSTS.read_text())["seconds_per_compile"]
    seen, rows = set(), []
    for step in steps:
        counts: dict[str, int] = {}
        if step == "tests":
            missing = sorted(set(gpu_tests) - set(GPU_TESTS))
            if missing:
                raise SystemExit(f"compile_budget: GPU tests without a declared compile plan: {missing}; "
                                 f"add them to GPU_TESTS in {Path(__file__).name}")
            for name in sorted(set(gpu_tests)):
                for fam, n in GPU_TESTS[name]:
                    counts[fam] = counts.get(fam, 0) + n
        else:
            for k in distinct(out / f"compiles_{step}.jsonl"):
                entry = json.dumps(k, sort_keys=True)
                if entry not in seen:
                    seen.add(entry)
                    counts[family(k["kernel"])] = counts.get(family(k["kernel"]), 0) + 1
        est = sum(n * costs[f] for f, n in counts.items())
        rows.append({"step": step, "compiles": sum(counts.values()), "by_family": counts, "estimate_s": round(est, 1)})
    return rows, sum(r["estimate_s"] for r in rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--measure"]:
        COSTS.write_text(json.dumps(measure(), indent=1) + "\n")
        print(COSTS.read_text())
        return 0
    out, steps = Path(argv[0]), argv[1:]
    gpu_tests_file = out / "gpu_tests.txt"
    gpu_tests = [l.split("::")[-1].split("[")[0] for l in gpu_tests_file.read_text().split() if "::" in l] \
        if gpu_tests_file.exists() else []
    rows, total = budget(out, steps, gpu_tests)
    costs = json.loads(COSTS.read_text())
    print(f"Triton compiles per step (new keys; s/compile measured here: "
          + ", ".join(f"{k} {v}" for k, v in costs["seconds_per_compile"].items()) + ")")
    for r in rows:
        fams = ", ".join(f"{k} {v}" for k, v in r["by_family"].items()) or "-"
        print(f"  {r['step']:<12}{r['compiles']:4d} compiles  ~{r['estimate_s']:6.1f} s   ({fams})")
    n = sum(r["compiles"] for r in rows)
    print(f"compile count: {n}; compile time estimate: {total:.0f} s (budget {BUDGET_S} s for the whole suite)")
    (out / "compile_budget.json").write_text(json.dumps({"rows": rows, "compiles": n, "estimate_s": round(total, 1),
                                                         "budget_s": BUDGET_S, "costs": costs}, indent=1))
    return 0 if total <= BUDGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
