#!/usr/bin/env bash
# The GPU suite in one call, sized to fit 8 minutes on one H100 / H200 (SUITE_S, default 480):
#   0. python -m randsac_fast.info --quick: versions, backends, bf16 self-check verdicts, ViT-B
#      timings ($OUT/info.json, rewritten after every verdict, so even a cut-short step leaves it),
#   1. build the CUDA extension, one architecture, MAX_JOBS parallel (a JIT build on first use if
#      the install fails),
#   2. the GPU test subset (kernel parity, dispatch, info) before anything slow,
#   3. the headline benchmarks in --quick mode, one JSON each under $OUT; auto's measured choices
#      are cached in $OUT/autotune.json and shared by every step (each shape is timed once),
#   4. the info report again, with the extension built (what to commit beside the benchmark JSON),
#   5. a combined summary table, printed last (also $OUT/suite_summary.txt).
#
#     OUT=benchmarks/results bash benchmarks/gpu_suite.sh
#     bash benchmarks/gpu_suite.sh --dry-run      # every step on the CPU, tiny configs (a rehearsal)
#
# --dry-run runs the same steps with the same scripts and flags on the CPU (Triton interpreter,
# smoke shapes, --tiny training, tests collected but not run, the build resolved by pip without
# compiling), so a typo cannot spend the one GPU call; tests/test_gpu_suite.py runs it.
# Each step has its own time limit (seconds, overridable: INFO_S, BUILD_S, TESTS_S, ATTN_S,
# TARGETS_S, SKIP_S, TRAIN_S), cut to what is left of SUITE_S, so one slow step cannot starve the
# others; a failing step is reported and the suite goes on. bench_train writes its JSON after every
# row and stops starting rows when its own budget is spent. Exit status: 0 only if every step succeeded.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument '$arg'; use --dry-run or nothing" >&2; exit 2 ;;
  esac
done

if (( DRY_RUN )); then
  OUT="${OUT:-$(mktemp -d)}"
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  # the interpreter runs one Triton program at a time: generous limits, the times mean nothing
  SUITE_S="${SUITE_S:-1200}"; INFO_S="${INFO_S:-240}"; TESTS_S="${TESTS_S:-180}"; ATTN_S="${ATTN_S:-240}"
  TARGETS_S="${TARGETS_S:-240}"; SKIP_S="${SKIP_S:-240}"; TRAIN_S="${TRAIN_S:-300}"
else
  OUT="${OUT:-benchmarks/results}"
fi
mkdir -p "$OUT"
LOGS="$(mktemp -d)"                  # full logs stay out of $OUT: one result file per benchmark there
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"   # H100 / H200 (sm_90): build one architecture
export MAX_JOBS="${MAX_JOBS:-16}"
export RANDSAC_FAST_AUTOTUNE_CACHE="${RANDSAC_FAST_AUTOTUNE_CACHE:-$OUT/autotune.json}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"          # this checkout, installed or not
# Compiled Triton kernels are cached on disk and shared by every step (a kernel compiled by info
# is loaded, not compiled, by tests and benchmarks); attention tiles are the pinned sm_90 set.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$HOME/.triton/cache}"
export RANDSAC_FAST_TILES="${RANDSAC_FAST_TILES:-pinned}"
# The dry run records every step's Triton compile keys (randsac_fast.kernels.compile_log).
COMPILE_LOG_DIR=""
(( DRY_RUN )) && COMPILE_LOG_DIR="$OUT"
declare -a STATUS=()
t_start=$SECONDS

# The whole suite ends within SUITE_S seconds, summary included.
DEADLINE=$(( SECONDS + ${SUITE_S:-480} - 35 ))   # reserve: a step's kill grace + the summary

# run NAME LIMIT_S CMD...: run a step under its time limit (cut to what is left of the suite's),
# keep its log, record its status.
run() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc left=$(( DEADLINE - SECONDS ))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then STATUS+=("$name: SKIPPED (suite time spent)"); return 1; fi
  echo "=== [$((SECONDS - t_start))s] $name: $*"
  RANDSAC_FAST_COMPILE_LOG="${COMPILE_LOG_DIR:+$COMPILE_LOG_DIR/compiles_$name.jsonl}" \
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

# Dry run: the CPU stand-ins of the GPU-only parts (same scripts, same flags otherwise).
if (( DRY_RUN )); then
  BUILD=(python -m pip install --dry-run -e . --no-build-isolation --no-deps -q)
  PYTEST_FLAGS=(--collect-only); BENCH_FLAGS=(--reps 1)
  TRAIN_FLAGS=(--tiny --device cpu --steps 1 --warmup 1 --profile-steps 1 --no-compile)
else
  BUILD=(python -m pip install -e . --no-build-isolation --no-deps -q)
  PYTEST_FLAGS=(); BENCH_FLAGS=(); TRAIN_FLAGS=()
fi
# The GPU test subset (-m gpu: the tests that need a CUDA device, marked in tests/conftest.py):
# bf16 / fp16 parity of every kernel against float64 and the CUDA extension, before the benchmarks.
GPU_TESTS=(tests/test_attention_triton.py tests/test_attention_cuda.py tests/test_attention_peers.py
           tests/test_targets_triton.py tests/test_skip_triton.py -m gpu)

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

# 0. What this machine runs (before the build: the triton / sdpa verdicts and timings need no extension).
run info "${INFO_S:-60}" python -m randsac_fast.info --quick --out "$OUT/info.json"

# 1. CUDA extension. If the editable install fails, the cuda backend compiles itself on first use.
if ! run build "${BUILD_S:-180}" "${BUILD[@]}"; then
  export RANDSAC_FAST_JIT=1
  STATUS+=("build: falling back to RANDSAC_FAST_JIT=1")
fi
if (( ! DRY_RUN )); then
  run load_extension "${BUILD_S:-180}" \
    python -c "from randsac_fast.kernels import cuda_ext; cuda_ext.load(); print('CUDA extension loaded')" \
    || STATUS+=("  (without the extension the cuda rows read 'unavailable')")
fi

# 2. The GPU test subset (the summary and any failures are kept in $OUT/pytest.txt).
run tests "${TESTS_S:-120}" python -m pytest -q "${GPU_TESTS[@]}" -p no:cacheprovider "${PYTEST_FLAGS[@]}"
grep -E "passed|failed|error|FAILED|ERROR|SKIPPED|collected|tests? collected" "$LOGS/tests.log" | tail -n 60 > "$OUT/pytest.txt"
(( DRY_RUN )) && grep "::" "$LOGS/tests.log" > "$OUT/gpu_tests.txt"

# 3. Headline benchmarks, --quick, one JSON each.
run attention   "${ATTN_S:-75}"    python benchmarks/bench_attention.py --quick --out "$OUT" "${BENCH_FLAGS[@]}"
run targets     "${TARGETS_S:-30}" python benchmarks/bench_targets.py --quick --out "$OUT" "${BENCH_FLAGS[@]}"
run skip_memory "${SKIP_S:-30}"    python benchmarks/bench_skip_memory.py --quick --out "$OUT" "${BENCH_FLAGS[@]}"
left=$(( DEADLINE - SECONDS ))
run train       "${TRAIN_S:-240}"  python benchmarks/bench_train.py --quick --out "$OUT" \
  --budget-s $(( left > 160 ? left - 100 : 60 )) "${TRAIN_FLAGS[@]}"

# 4. The report again, now with the extension's verdicts and warm kernels (fits in train's reserve).
#    The same command as step 0 with another --out: the dry run does not repeat it.
(( DRY_RUN )) || run info_after_build "${INFO_S:-60}" python -m randsac_fast.info --quick --out "$OUT/info_after_build.json"

# Dry run: how many Triton compiles each step triggers on a GPU and what they cost (measured here).
if (( DRY_RUN )); then
  python benchmarks/compile_budget.py "$OUT" info tests attention targets skip_memory train \
    | tee "$OUT/compile_budget.txt" || STATUS+=("compile_budget: FAILED (estimate over budget or a GPU test without a plan)")
fi

# 5. Combined summary, last.
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


def info(res):
    verdicts = res.get("selfcheck") or []
    bad = [v for v in verdicts if v["status"] in ("mismatch", "error")]
    print(f"\nself-check: {len(verdicts)} verdicts, {len(bad)} failed"
          + "".join(f"\n  FAILED {v['op']} {v['backend']} {v['dtype']} {','.join(v['structure'])}: "
                    f"{(v['detail'] or str(v['errors']))[:120]}" for v in bad))
    for a in res.get("auto") or []:
        row = next((r for r in res["timing"] if r.get("ms") and r["op"] == a["op"] and r["shape"] == a["shape"]), None)
        times = "  ".join(f"{n} {'-' if t is None else f'{t:.3f}'}" for n, t in (row or {}).get("ms", {}).items())
        print(f"  auto {a['op']:<18}{a['shape']:<20}-> {a['chosen']:<8} (ms: {times})")


print("\n==================== GPU suite summary ====================")
for s in status:
    print("  " + s)
if (out / "compile_budget.txt").exists():
    print("  " + (out / "compile_budget.txt").read_text().strip().splitlines()[-1])
tests = (out / "pytest.txt").read_text().strip().splitlines() if (out / "pytest.txt").exists() else []
print("  pytest: " + (tests[-1] if tests else "no summary"))
meta = next((m for m in map(latest, ("train", "attention", "targets", "skip_memory")) if m), None)
if meta:
    print(f"  {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  cuda {meta['cuda']}  "
          f"commit {(meta.get('git_commit') or '?')[:10]}")
for name in ("info_after_build", "info"):
    if (out / f"{name}.json").exists():
        try:
            info(json.loads((out / f"{name}.json").read_text()))
        except (KeyError, TypeError, ValueError) as e:
            print(f"\n{name}: could not summarise ({type(e).__name__}: {e}); see its JSON")
        break
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

echo "total $((SECONDS - t_start)) s; logs in $LOGS; results in $OUT"
for s in "${STATUS[@]}"; do [[ $s == *": ok "* ]] || exit 1; done
exit 0
