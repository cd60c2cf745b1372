#!/usr/bin/env bash
# One call on a bare GPU machine (python3 with torch and triton, no registry):
# build dsv3._C in place for Hopper, run the GPU tests, run the GPU benchmarks,
# and leave logs, JSON and a markdown table in $OUT. Meant to finish in < 9 min:
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DSV3_CUDA_ARCHS=${DSV3_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
status=0

{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } \
  > "$OUT/machine.txt" 2>&1

echo "== build" | tee "$OUT/build.log"
if ! DSV3_BUILD_CUDA=1 python3 setup.py -q build_ext --inplace >> "$OUT/build.log" 2>&1; then
  echo "build failed" | tee -a "$OUT/build.log"; tail -40 "$OUT/build.log"; exit 1
fi

echo "== pytest -m gpu"
timeout 240 python3 -m pytest -q --maxfail=20 -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmarks"
timeout 200 python3 -m benchmarks.gpu_bench --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
