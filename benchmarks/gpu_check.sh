#!/usr/bin/env bash
# The prepared GPU run for issues 3 and 13 (a lent GPU gives a session 15 minutes in all, start-up included):
# build the extensions, run the op tests (each backend on its own device: CUDA and Triton on the GPU, the
# aggregation at SD 1.5 / SD 2.x / SDXL shapes with 77-231 tokens, the sync-free step), the kernel benchmarks
# in fp16 and bf16 (GB/s against the copy bandwidth), then benchmarks/gpu_e2e.py: host synchronisations of
# SP-Guard generations (phase 1 and 2), time on a random SD-1.5-sized UNet (fp16, 512 px, T = 50, batch 1 and
# 8: SP-Guard benign and harmful against CFG) and the torch.compile(mode="reduce-overhead") step, last.
# Never run yet (no GPU was lent to issue 13); estimated 8-10 minutes on an H200 machine: call the device tool
# with timeout_s=600. The compile check (two UNet compilations) runs in a second call if time is left:
#   python3 benchmarks/gpu_e2e.py --parts compile
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
# The slow tests are CPU-only (the SD-1.5 capture on the C++ backend, torch.compile on the CPU): not here.
timeout 180 python3 -m pytest -q -rs -p no:cacheprovider -m "not slow" tests/test_ops_*.py >"$out/tests.log" 2>&1
tail -n 30 "$out/tests.log"
for dtype in float16 bfloat16; do
  timeout 60 python3 -m spguard.cli bench --part kernels --dtype "$dtype" 2>&1 | tee "$out/bench_$dtype.log"
done
timeout 200 python3 benchmarks/gpu_e2e.py --parts sync time 2>&1 | tee "$out/gpu_e2e.log"
