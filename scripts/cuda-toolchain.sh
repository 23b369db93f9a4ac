#!/usr/bin/env bash
# Sets up a CUDA 13.0 toolchain from PyPI wheels (this machine has no nvcc and no GPU) under
# .cuda-venv and .cuda-root, then runs the command given with the environment that candle,
# cudarc and ember-kernels' build script need, e.g.:
#   scripts/cuda-toolchain.sh cargo build --release --features cuda
# Stay on nvcc 13.0.x: the GPU machine's driver (580) runs CUDA 13.0 and cannot load the PTX
# that newer nvcc versions emit.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$REPO/.cuda-venv
ROOT=$REPO/.cuda-root
WHEELS=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
)

if [ ! -f "$ROOT/.ready" ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${WHEELS[@]}"
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  CU=$SITE/nvidia/cu13
  [ -x "$CU/bin/nvcc" ] || { echo "nvcc not found under $CU" >&2; exit 1; }
  rm -rf "$ROOT"
  mkdir -p "$ROOT/lib64/stubs"
  for d in bin include nvvm lib; do ln -s "$CU/$d" "$ROOT/$d"; done
  # Unversioned names for the linker.
  for lib in cudart cublas cublasLt curand nvrtc; do
    target=$(ls "$CU"/lib/lib$lib.so.* 2>/dev/null | sort | head -n 1)
    [ -n "$target" ] || { echo "lib$lib.so.* not found under $CU/lib" >&2; exit 1; }
    ln -s "$target" "$ROOT/lib64/lib$lib.so"
  done
  # No wheel ships the driver library: link against a stub exporting every driver symbol that
  # cudarc declares. The real libcuda.so.1 is used at run time on a GPU machine.
  (cd "$REPO" && cargo fetch --quiet)
  CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort | tail -n 1)
  grep -ohE 'pub unsafe fn cu[A-Za-z0-9_]+' "$CUDARC/src/driver/sys/mod.rs" | sed 's/pub unsafe fn //' | sort -u \
    | awk '{ print "int " $1 "(void) { return 100; }" }' > "$ROOT/lib64/stubs/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib64/stubs/libcuda.so" "$ROOT/lib64/stubs/libcuda_stub.c"
  ln -s libcuda.so "$ROOT/lib64/stubs/libcuda.so.1"
  touch "$ROOT/.ready"
fi

export CUDA_ROOT=$ROOT CUDA_HOME=$ROOT CUDA_PATH=$ROOT
export PATH=$ROOT/bin:$PATH NVCC=$ROOT/bin/nvcc
# PTX for compute_80 unless told otherwise: the driver JIT-compiles it for any GPU of
# capability 8.0 or newer (Ampere, Ada, Hopper, Blackwell), so one binary serves them all.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
export LIBRARY_PATH=$ROOT/lib64:$ROOT/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
# Lets the CUDA build run here (device creation then reports that there is no GPU).
export LD_LIBRARY_PATH=$ROOT/lib:$ROOT/lib64/stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if [ "$#" -gt 0 ]; then
  exec "$@"
fi
