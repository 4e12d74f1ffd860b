#!/usr/bin/env bash
# Build crisp_et_runner with plain g++ against the headers and libraries the executorch wheel ships.
#   export/executorch/runner/build.sh [PYTHON] [OUT]    (default: .venv/bin/python, export/executorch/runner/build/crisp_et_runner)
# crisp-edge's own kernels (../kernels/*.cpp: operators such as crisp::rowmajor_linear) are compiled in.
# CMake is not needed (the wheel's CMake config wants 3.28; the definitions below are the ones it sets).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${1:-$HERE/../../../.venv/bin/python}"
OUT="${2:-$HERE/build/crisp_et_runner}"
ET="$("$PY" -c 'import executorch; print(list(executorch.__path__)[0])')"
mkdir -p "$(dirname "$OUT")"
g++ -std=c++17 -O2 -fopenmp-simd -Wno-deprecated-declarations -o "$OUT" "$HERE/crisp_et_runner.cpp" "$HERE"/../kernels/*.cpp \
  -I"$ET/include" -I"$ET/include/executorch/runtime/core/portable_type/c10" \
  -DC10_USING_CUSTOM_GENERATED_MACROS -DET_EVENT_TRACER_ENABLED -DET_USE_THREADPOOL \
  -L"$ET/lib" -Wl,-rpath,"$ET/lib" -lexecutorch -lexecutorch_threadpool \
  -Wl,--push-state,--no-as-needed -lexecutorch_kernels_optimized -lexecutorch_backend_xnnpack -Wl,--pop-state
echo "built $OUT"
