#!/usr/bin/env bash
# One call on a bare GPU machine (python3 with torch and triton, no registry):
# build dsv3._C in place for Hopper, run the GPU benchmarks, run the GPU tests,
# profile the wgrad under Nsight Compute if time is left, and leave logs, JSON and a
# markdown table in $OUT (at most 8 files come back: these are 8).
#   run(command="TOTAL_S=530 bash benchmarks/gpu_check.sh", timeout_s=570)
# The whole script keeps inside TOTAL_S (default 500 s): each phase has its own
# limit and the benchmarks stop starting new cases when their time is up, so a slow
# phase costs figures, not the run. On an H200 (2026-11-30, commit b785d62): build
# 50 s, every benchmark case 111 s, the 822 GPU tests 281 s in 16 workers (Triton's
# compiles dominate; a cache warmed by an earlier call covered 61% of them), ncu 80 s.
# TOTAL_S=530 (the issue asks for under 9 minutes) leaves the tests about 325 s; the
# tests have grown to 1,068 since (every tuned GEMM config among them), so a cold run may
# not finish them: pytest_gpu.log lists the 30 slowest, to rebalance from.
# The benchmarks run before the tests: that day the tests came first, were stopped
# at 61% and left the benchmarks 64 s. Each failure is written to
# pytest_failures.txt as it happens (tests/conftest.py), so a stopped pytest still
# says what failed. If a benchmark loses the CUDA context, the cases left run again
# without the GEMMs' TMA and persistent variants (below). Before
# spending device time, `python -m benchmarks.sm90_compile_check` and
# `python -m benchmarks.gpu_bench --smoke --out DIR` check the Triton kernels and
# every benchmark case here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out/gpu}
TOTAL_S=${TOTAL_S:-500}
mkdir -p "$OUT"
# DSV3_AUTOTUNE_CACHE=0: every run (a resumed one too) times the configs afresh.
export PYTHONUNBUFFERED=1 DSV3_CUDA_ARCHS=${DSV3_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16} \
  DSV3_AUTOTUNE_CACHE=0
# setup.py defaults CUDA_HOME to /usr/local/cuda; where that has no toolkit, take the
# one torch's own search finds (CUDA_PATH, then the nvcc on PATH).
if [ -z "${CUDA_HOME:-}" ] && [ ! -f /usr/local/cuda/include/cuda_runtime.h ]; then
  CUDA_HOME=$(python3 -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')")
  export CUDA_HOME
fi
status=0
left() { echo $((TOTAL_S - SECONDS)); }

{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
  nvcc --version | tail -2; echo "CUDA_HOME=${CUDA_HOME:-}"; } > "$OUT/machine.txt" 2>&1

echo "== build (CUDA kernels for sm_$DSV3_CUDA_ARCHS)" | tee "$OUT/build.log"
if ! DSV3_BUILD_CUDA=1 timeout 200 python3 setup.py -q build_ext --inplace >> "$OUT/build.log" 2>&1; then
  # Without csrc/cuda the Triton kernels still cover every op on the GPU: go on, but fail.
  echo "CUDA build failed; building the CPU extension only" | tee -a "$OUT/build.log"
  tail -30 "$OUT/build.log"; status=1
  DSV3_BUILD_CUDA=0 timeout 120 python3 setup.py -q build_ext --inplace >> "$OUT/build.log" 2>&1 \
    || { echo "CPU build failed too" | tee -a "$OUT/build.log"; tail -30 "$OUT/build.log"; exit 1; }
fi
echo "   built at $SECONDS s"


echo "== benchmarks"
# At most 150 s (every case took 111 s), keeping 300 s for the tests after them.
bench_s=$(( $(left) - 300 < 150 ? $(left) - 300 : 150 ))
[ "$bench_s" -gt 90 ] || bench_s=90
# SIGINT at the limit (KILL 10 s later): gpu_bench's traceback then says which case it
# was in, and pytest below still prints its summary and its 30 slowest (TERM ends both
# silently). The 10 s come out of the tests' time, which is counted after.
timeout -s INT -k 10 "$bench_s" python3 -m benchmarks.gpu_bench --out "$OUT" \
  --budget-s $((bench_s - 30)) > "$OUT/bench.log" 2>&1
bench_status=$?
[ "$bench_status" -eq 0 ] || status=1
# Status 4: every case ran, but some computed a wrong result (their rows' check column
# says which; their timings are no figures): the run fails, the tests below say more.
# Status 3: a case lost the CUDA context (illegal address, device-side assert), so
# every later case would fail too. Run the cases left in a fresh process, the GEMMs
# without their TMA and persistent variants (the least proven code); a case that
# loses it again is skipped by the next try.
for _ in 1 2; do
  [ "$bench_status" -eq 3 ] && [ "$(left)" -gt 360 ] || break
  echo "   CUDA context lost at $SECONDS s: resuming without the GEMM variants" | tee -a "$OUT/bench.log"
  bench_s=$(( $(left) - 300 ))
  DSV3_GEMM_VARIANTS=0 timeout -s INT -k 10 "$bench_s" python3 -m benchmarks.gpu_bench \
    --out "$OUT" --resume \
    --budget-s $((bench_s - 30)) >> "$OUT/bench.log" 2>&1
  bench_status=$?
done
[ "$bench_status" -eq 0 ] || status=1
echo "   benchmarks done at $SECONDS s"

# The op, layer and integration files with gpu-marked tests, in 16 workers on the 16
# cores (Triton compiles dominate, one at a time in each), one matmul config each
# (DSV3_AUTOTUNE=0: the benchmarks autotune). Each failure goes to
# pytest_failures.txt as it happens.
echo "== pytest -m gpu"
tests=(tests/test_route.py tests/test_route_extremes.py tests/test_permute.py tests/test_grouped_mm.py tests/test_swiglu.py
       tests/test_quantize.py tests/test_moe.py tests/test_moe_balance.py tests/test_cuda_graph.py
       tests/test_errors.py tests/test_gpu_hazards.py tests/test_ops_review.py
       tests/test_transformers_integration.py
       tests/test_gpt_oss_glu.py tests/test_expert_bias.py tests/test_transformers_gpt_oss.py
       tests/test_distributed.py tests/test_triton_scratch.py
       tests/test_gemm_tuned_configs.py)  # last: dozens of compiles, see its docstring
parallel=()
python3 -c "import xdist" 2> /dev/null && parallel=(-n 16)
python3 -c "import pytest_timeout" 2> /dev/null && parallel+=(--timeout 120)
rm -f "$OUT/pytest_failures.txt"  # from an earlier run into the same folder
# Stopped by SIGINT (see the benchmarks): -k leaves 10 s for a worker stuck in a kernel.
test_s=$(( $(left) - 15 > 30 ? $(left) - 15 : 30 ))
DSV3_AUTOTUNE=0 DSV3_FAILURE_LOG="$OUT/pytest_failures.txt" timeout -s INT -k 10 "$test_s" \
  python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
  --durations=30 "${parallel[@]}" "${tests[@]}" > "$OUT/pytest_gpu.log" 2>&1
[ $? -eq 0 ] || status=1
[ -f "$OUT/pytest_failures.txt" ] && grep "^==== " "$OUT/pytest_failures.txt" | sort -u | head -30
tail -3 "$OUT/pytest_gpu.log"
echo "   tests done at $SECONDS s"

# Nsight Compute on a few launches of the wgrad (benchmarks/ncu_case.py), where ncu is
# installed and time is left: throughput, occupancy and warp stalls of each launch
# (--clock-control none: the card's clocks as found). A profile, not a check: a
# failure here does not fail the run.
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2> /dev/null | head -1)
if [ -n "$NCU" ] && [ "$(left)" -gt 60 ]; then
  echo "== ncu: $NCU"
  timeout $(( $(left) - 5 )) "$NCU" --clock-control none -k regex:_grouped_mm \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    python3 -m benchmarks.ncu_case > "$OUT/ncu.txt" 2>&1 || echo "   ncu did not finish (ncu.txt)"
  grep -E "^ +(Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per Thread) " \
    "$OUT/ncu.txt" | head -24
fi
[ -f "$OUT/gpu_bench.md" ] && cat "$OUT/gpu_bench.md" || tail -30 "$OUT/bench.log"
echo "== done at $SECONDS s, status $status"
exit $status
