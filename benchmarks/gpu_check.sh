#!/usr/bin/env bash
# The prepared GPU run for issue 3 (a lent GPU gives a session 15 minutes in all, start-up included):
# build the extensions, run the op tests (each backend on its own device: CUDA and Triton on the GPU),
# then the kernel benchmarks in three dtypes and the end-to-end one. About 8 minutes on an H200 machine.
# Logs go to $OUT (the device tool's output folder) or out/gpu.
#
# The GPU machine has torch, triton and nvcc but not diffusers, and fetches nothing. Before calling the
# device tool, put the missing wheels into .whl (git-ignored), from the repository root here:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 importlib_metadata zipp
# then call it with carry [".whl"] and the command `bash benchmarks/gpu_check.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
  CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"
  export CUDA_HOME
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"
time python3 -m pip install --no-index --no-deps --no-build-isolation -e . >"$out/build.log" 2>&1
grep -i "spguard:" "$out/build.log"
python3 -c "import spguard; print(*spguard.backends(), sep='\n')" 2>&1 | tee "$out/backends.txt"
timeout 300 python3 -m pytest -q -rs -p no:cacheprovider tests/test_ops_*.py >"$out/tests.log" 2>&1
tail -n 30 "$out/tests.log"
for dtype in float32 float16 bfloat16; do
  timeout 90 python3 -m spguard.cli bench --part kernels --dtype "$dtype" 2>&1 | tee "$out/bench_$dtype.log"
done
timeout 180 python3 -m spguard.cli bench --part e2e 2>&1 | tee "$out/bench_e2e.log"
