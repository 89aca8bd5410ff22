#!/usr/bin/env bash
# Compile-checks each CUDA kernel file (csrc/cuda/*.cu) on its own with nvcc for sm_90, the cheap check
# that runs on machines without a GPU. Skips with a notice when nvcc is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# nvcc 13 lives in the CUDA toolkit folder; the nvcc first on PATH may belong elsewhere
# (docs/design.md, "Measured on the development machines").
if [[ -z "${CUDA_HOME:-}" ]]; then
  for candidate in /usr/local/cuda /usr/local/cuda-13.0; do
    if [[ -x "$candidate/bin/nvcc" ]]; then CUDA_HOME="$candidate"; break; fi
  done
fi
NVCC="${CUDA_HOME:+$CUDA_HOME/bin/}nvcc"
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "compile_cuda: nvcc not found (set CUDA_HOME); skipping the CUDA compile check"
  exit 0
fi
export CUDA_HOME

ARCH="${SPGUARD_CUDA_ARCH:-90}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for source in csrc/cuda/*.cu; do
  "$NVCC" -c -std=c++17 -O3 -gencode "arch=compute_${ARCH},code=sm_${ARCH}" "$source" -o "$out/$(basename "$source").o"
  echo "compile_cuda: ok $source (sm_${ARCH})"
done
