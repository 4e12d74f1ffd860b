#!/usr/bin/env bash
# Cross-compile crisp_et_runner for 64-bit ARM Linux (aarch64) with Debian's toolchain, against the
# headers and shared libraries of the executorch 1.5.1 aarch64 wheel from PyPI (the same C++ runtime
# the x86-64 build links; the wheel's .so files need only glibc >= 2.28 and libstdc++).
#
#   export/executorch/runner/build_arm64.sh [OUT]     (default: export/executorch/runner/build/arm64/crisp_et_runner)
#
# - the wheel is downloaded once with pip into build/arm64/cache/ and its include/ and lib/ unpacked
#   into build/arm64/executorch/ (the runner's rpath is $ORIGIN/executorch/lib: ship that folder beside it);
# - Debian packages g++-aarch64-linux-gnu (compiler, aarch64 glibc and libstdc++ under
#   /usr/aarch64-linux-gnu) and qemu-user (to run it on x86-64) are installed only when missing.
# Run it on an x86-64 host:  qemu-aarch64 -L /usr/aarch64-linux-gnu OUT BUNDLE OUT_DIR --inputs IN --cases N ...
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:-$HERE/build/arm64/crisp_et_runner}"
OUTDIR="$(mkdir -p "$(dirname "$OUT")" && cd "$(dirname "$OUT")" && pwd)"
ET_VERSION=1.5.1
WHEEL="executorch-${ET_VERSION}-cp311-cp311-manylinux_2_28_aarch64.whl"
CACHE="$HERE/build/arm64/cache"
PY="${PYTHON:-$HERE/../../../.venv/bin/python}"
[ -x "$PY" ] || PY=python3

need=()
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "installing Debian packages: ${need[*]}"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

mkdir -p "$CACHE"
if [ ! -f "$CACHE/$WHEEL" ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --python-version 3.11 --implementation cp "executorch==$ET_VERSION" -d "$CACHE"
fi
[ -f "$CACHE/$WHEEL" ] || { echo "build_arm64.sh: pip did not deliver $WHEEL" >&2; exit 1; }

ET="$OUTDIR/executorch"
if [ ! -f "$ET/.unpacked-$ET_VERSION" ]; then
  rm -rf "$ET" && mkdir -p "$ET"
  "$PY" - "$CACHE/$WHEEL" "$ET" <<'EOF'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():  # only the C++ side: headers and the runtime's shared libraries
        if name.startswith("executorch/include/") or (name.startswith("executorch/lib/") and name.endswith(".so")):
            rel = name[len("executorch/"):]
            if ".." in rel.split("/"):
                raise SystemExit(f"unsafe path in wheel: {name}")
            target = f"{dest}/{rel}"
            if name.endswith("/"):
                continue
            import os
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as dst:
                dst.write(src.read())
EOF
  touch "$ET/.unpacked-$ET_VERSION"
fi

aarch64-linux-gnu-g++ -std=c++17 -O2 -fopenmp-simd -Wno-deprecated-declarations -o "$OUT" "$HERE/crisp_et_runner.cpp" "$HERE"/../kernels/*.cpp \
  -I"$ET/include" -I"$ET/include/executorch/runtime/core/portable_type/c10" \
  -DC10_USING_CUSTOM_GENERATED_MACROS -DET_EVENT_TRACER_ENABLED -DET_USE_THREADPOOL \
  -L"$ET/lib" -Wl,-rpath,'$ORIGIN/executorch/lib' -Wl,-rpath-link,"$ET/lib" -lexecutorch -lexecutorch_threadpool \
  -Wl,--push-state,--no-as-needed -lexecutorch_kernels_optimized -lexecutorch_backend_xnnpack -Wl,--pop-state
echo "built $OUT (aarch64; libraries in $ET/lib)"
