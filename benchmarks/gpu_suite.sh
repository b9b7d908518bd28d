#!/usr/bin/env bash
# The GPU suite in one call, sized to fit 9 minutes on one H100 (SUITE_S, below):
#   1. build the CUDA extension (falls back to a JIT build on first use if the install fails),
#   2. run the test suite (on a GPU the CUDA-only parity tests run too),
#   3. run every benchmark in --quick mode, one JSON each under $OUT,
#   4. print a combined summary table last (also written to $OUT/suite_summary.txt).
#
#     OUT=benchmarks/results bash benchmarks/gpu_suite.sh
#
# Each step has its own time limit (seconds, overridable: BUILD_S, TESTS_S, ATTN_S, TARGETS_S,
# SKIP_S, TRAIN_S) so that one slow step cannot starve the others, and all of them fit in SUITE_S
# (default 540); a failing step is reported and the suite goes on. bench_train writes its JSON
# after every row and stops starting rows when its own budget (what the suite has left, less a
# reserve for one compiled row and the profile) is spent. Exit status: 0 only if every step succeeded.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
LOGS="$(mktemp -d)"                  # full logs stay out of $OUT: one result file per benchmark there
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"   # H100 / H200 (sm_90): build one architecture
export MAX_JOBS="${MAX_JOBS:-16}"
declare -a STATUS=()
t_start=$SECONDS

# The whole suite ends within SUITE_S seconds, summary included.
DEADLINE=$(( SECONDS + ${SUITE_S:-540} - 35 ))   # reserve: a step's kill grace + the summary

# run NAME LIMIT_S CMD...: run a step under its time limit (cut to what is left of the suite's),
# keep its log, record its status.
run() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc left=$(( DEADLINE - SECONDS ))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then STATUS+=("$name: SKIPPED (suite time spent)"); return 1; fi
  echo "=== [$((SECONDS - t_start))s] $name: $*"
  timeout --kill-after=20 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  tail -n 40 "$LOGS/$name.log"
  case $rc in
    0) STATUS+=("$name: ok ($((SECONDS - t0)) s)") ;;
    124|137) STATUS+=("$name: TIMED OUT after ${limit} s (partial results, if any, are in \$OUT)") ;;
    *) STATUS+=("$name: FAILED rc=$rc ($((SECONDS - t0)) s)") ;;
  esac
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

# 1. CUDA extension. If the editable install fails, the cuda backend compiles itself on first use.
if ! run build "${BUILD_S:-240}" python -m pip install -e . --no-build-isolation --no-deps -q; then
  export RANDSAC_FAST_JIT=1
  STATUS+=("build: falling back to RANDSAC_FAST_JIT=1")
fi
run load_extension "${BUILD_S:-240}" \
  python -c "from randsac_fast.kernels import cuda_ext; cuda_ext.load(); print('CUDA extension loaded')" \
  || STATUS+=("  (without the extension the cuda rows read 'unavailable')")

# 2. Tests (the summary and any failures are kept in $OUT/pytest.txt).
run tests "${TESTS_S:-180}" python -m pytest -q tests/ -p no:cacheprovider
grep -E "passed|failed|error|FAILED|ERROR|SKIPPED" "$LOGS/tests.log" | tail -n 60 > "$OUT/pytest.txt"

# 3. Benchmarks, --quick, one JSON each.
run attention   "${ATTN_S:-90}"    python benchmarks/bench_attention.py --quick --out "$OUT"
run targets     "${TARGETS_S:-45}" python benchmarks/bench_targets.py --quick --out "$OUT"
run skip_memory "${SKIP_S:-45}"    python benchmarks/bench_skip_memory.py --quick --out "$OUT"
left=$(( DEADLINE - SECONDS ))
run train       "${TRAIN_S:-300}"  python benchmarks/bench_train.py --quick --out "$OUT" \
  --budget-s $(( left > 160 ? left - 100 : 60 ))

# 4. Combined summary, last.
python - "$OUT" "${STATUS[@]}" <<'EOF' | tee "$OUT/suite_summary.txt"
import json, sys
from pathlib import Path

out, status = Path(sys.argv[1]), sys.argv[2:]


def latest(prefix):
    files = sorted(out.glob(f"{prefix}_*.json"))
    return json.loads(files[-1].read_text()) if files else None


def attention(res):
    print("\nattention fwd+bwd (ms, TFLOP/s over visible pairs)")
    for r in res["records"]:
        if r["mode"] == "fwd+bwd":
            print(f"  {r['shape']:<22}{r['backend']:<14}{r['ms']:9.3f} ms {r['tflops']:8.1f}")


def bandwidth(name):
    def show(res):
        print(f"\n{name} (median ms, fraction of copy bandwidth)")
        for r in res["rows"]:
            label = " ".join(str(r[k]) for k in ("case", "image", "N", "blur_k") if k in r)
            print(f"  {label:<28}{r['backend']:<10}{r['median_ms']:9.3f} ms {r['frac_of_copy_bw']:6.2f}")
    return show


def train(res):
    print(f"\ntrain step, batch {res['batch']}, {res['dtype']} (img/s, MFU, x dense eager / compiled, peak GiB)")
    for r in res["rows"]:
        head = f"  {r['model']:<8}{r['impl']:<10}{r['compile']:<9}"
        if r["status"] != "ok":
            print(f"{head}{r['status']}: {(r['reason'] or '')[:70]}")
            continue
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "    -"
        ratio = lambda k: f"{r[k]:.2f}" if r.get(k) is not None else "-"
        print(f"{head}{r['img_s']:9.1f} {mfu}  x{ratio('x_dense')} / x{ratio('x_dense_c')}  "
              f"{r.get('peak_mem_gib', '-')}")
    prof = res.get("profile") or {}
    if prof.get("families"):
        print(f"  profile of {prof['config']}: " + ", ".join(f"{k} {v:.0%}" for k, v in prof["families"].items()))


print("\n==================== GPU suite summary ====================")
for s in status:
    print("  " + s)
tests = (out / "pytest.txt").read_text().strip().splitlines() if (out / "pytest.txt").exists() else []
print("  pytest: " + (tests[-1] if tests else "no summary"))
meta = next((m for m in map(latest, ("train", "attention", "targets", "skip_memory")) if m), None)
if meta:
    print(f"  {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  cuda {meta['cuda']}  "
          f"commit {(meta.get('git_commit') or '?')[:10]}")
for name, show in (("attention", attention), ("targets", bandwidth("targets")),
                   ("skip_memory", bandwidth("skip_memory")), ("train", train)):
    try:
        res = latest(name)
        if res is None:
            print(f"\n{name}: no result file")
        else:
            show(res)
    except (KeyError, TypeError, ValueError) as e:   # a format change must not hide the other sections
        print(f"\n{name}: could not summarise ({type(e).__name__}: {e}); see its JSON")
EOF

echo "total $((SECONDS - t_start)) s; logs in $LOGS"
for s in "${STATUS[@]}"; do [[ $s == *": ok "* ]] || exit 1; done
exit 0
