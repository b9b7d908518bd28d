#!/usr/bin/env bash
# Compile every source of the CUDA extension without a GPU: object compiles only, nothing runs.
#
#   kernels (*.cu)      nvcc, for sm_80 and sm_90; they include only CUDA headers and segattn.h
#   binding, tests (*.cpp)  the host compiler against torch's (CPU-wheel) headers and pybind11
#
# Exits non-zero on the first failed compile. NVCC, CXX and PYTHON may override the tools.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
NVCC="${NVCC:-nvcc}"
CXX="${CXX:-g++}"
PYTHON="${PYTHON:-python}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

torch_inc="$("$PYTHON" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths()))')"
py_inc="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
echo "nvcc: $("$NVCC" --version | tail -1)"
echo "c++:  $("$CXX" --version | head -1)"

# The torch builds this targets compile extensions as C++17 (older) or C++20 (newer): sm_80
# objects are built as C++17 and sm_90 as C++20, so both dialects are covered.
# torch's extension build adds these: the kernels must not rely on implicit half/bf16 conversions.
torch_defs="-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr"
pids=()
names=()
for cu in "$here"/*.cu; do
  for arch in 80 90; do
    std=c++17; [ "$arch" = 90 ] && std=c++20
    name="$(basename "$cu") sm_$arch $std"
    "$NVCC" -std=$std -O3 $torch_defs -gencode "arch=compute_$arch,code=sm_$arch" -Xptxas=-warn-spills -I"$here" \
      -c "$cu" -o "$out/$(basename "$cu").$arch.o" > "$out/log.$arch.$(basename "$cu")" 2>&1 &
    pids+=($!)
    names+=("$name")
  done
done
status=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then echo "ok      ${names[$i]}"; else echo "FAILED  ${names[$i]}"; status=1; fi
done
cat "$out"/log.* || true
[ "$status" = 0 ] || exit 1

for cpp in "$here"/*.cpp; do
  # -DTORCH_EXTENSION_NAME as the extension build defines it; torch needs C++20 headers from 2.10 on.
  "$CXX" -std=c++20 -O1 -fPIC -DTORCH_EXTENSION_NAME=_C $torch_inc -I"$py_inc" -I"$here" \
    -c "$cpp" -o "$out/$(basename "$cpp").o"
  echo "ok      $(basename "$cpp") (host $CXX, torch headers)"
done
echo "compile check passed"
