#!/usr/bin/env bash
# Build crisp-edge's ExecuTorch kernels (every *.cpp here) into one shared library, against the headers and
# libexecutorch.so the executorch wheel ships (the library registers its kernels into that runtime when loaded:
# export/executorch/custom_ops.py loads it into Python's runtime; the C++ runner compiles the same sources in).
#   export/executorch/kernels/build.sh [PYTHON] [OUT]   (default: .venv/bin/python, kernels/build/libcrisp_et_kernels.so)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${1:-$HERE/../../../.venv/bin/python}"
OUT="${2:-$HERE/build/libcrisp_et_kernels.so}"
ET="$("$PY" -c 'import executorch; print(list(executorch.__path__)[0])')"
mkdir -p "$(dirname "$OUT")"
TMP="$OUT.tmp.$$"
trap 'rm -f "$TMP"' EXIT
g++ -std=c++17 -O3 -fopenmp-simd -shared -fPIC -Wno-deprecated-declarations -o "$TMP" "$HERE"/*.cpp \
  -I"$ET/include" -I"$ET/include/executorch/runtime/core/portable_type/c10" -DC10_USING_CUSTOM_GENERATED_MACROS \
  -L"$ET/lib" -Wl,-rpath,"$ET/lib" -lexecutorch
mv -f "$TMP" "$OUT"   # whole or not at all: a reader never sees a half-written library
echo "built $OUT"
