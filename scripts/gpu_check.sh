#!/usr/bin/env bash
# One prepared run for a lent GPU machine (no package registry there; its python3 has torch, triton,
# transformers, pytest, pytest-benchmark). Builds the CUDA extension, runs the GPU tests and the GPU
# benchmarks, writes everything under $OUT (default ./gpu_out) and prints a short table last.
#   device: GPU_CHECK_COMMIT=<sha> bash scripts/gpu_check.sh      (timeout_s 400)
# It installs the package (pip install -e .) into $PYTHON's environment: meant for the GPU machine.
# The steps share one deadline ($GPU_CHECK_SECONDS, default 360 s, so a 15-minute lease has room for a second
# call): each gets at most its own cap and what is left; a step with under 20 s left is skipped, saying so,
# and the table is always printed. The steps run in the order of what the open issues need most: kernel
# correctness, the operator benchmark, the driver on the GPU, the cpu tier with and without double buffering,
# the merge benchmark. GPU_CHECK_ONLY="e2e merge-bench" runs only the named steps (on a warm machine the
# extension built by the first call is still there; it is rebuilt when missing).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
cd "$ROOT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
DEADLINE=$(( T0 + ${GPU_CHECK_SECONDS:-360} ))
ONLY="${GPU_CHECK_ONLY:-}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# step NAME CAP_SECONDS LOG command...: runs the command under min(cap, time left), records rc and seconds
step() {
  local name=$1 cap=$2 log=$3; shift 3
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
    if [ "$name" != build ] || ls evolver_kernels/_cuda*.so > /dev/null 2>&1; then
      return
    fi
  fi
  local left=$(( DEADLINE - $(date +%s) ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 20 ]; then
    printf '%-22s skipped: %ss left of the deadline\n' "$name" "$left" | tee -a "$SUMMARY"
    return
  fi
  echo "== $name (at most ${limit}s)"
  local start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  local note=""
  [ "$rc" -eq 124 ] && note=" (timed out)"
  printf '%-22s rc=%s%s in %ss\n' "$name" "$rc" "$note" "$(( $(date +%s) - start ))" | tee -a "$SUMMARY"
  tail -3 "$OUT/$log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
  echo "commit ${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

step build 240 build.log env EVOLVER_KERNELS_FORCE_CUDA_BUILD=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  MAX_JOBS=16 "$PY" -m pip install --no-build-isolation --no-deps -e .

# kernels against the reference on the GPU: every backend, dtype, odd sizes, chunking, > 2**31 elements
step kernel-tests 150 tests.log "$PY" -m pytest -q -x tests/test_philox.py tests/test_crossover_mask.py \
  tests/test_de_mutate_crossover.py tests/test_merge_tensors.py tests/test_large_gpu.py tests/test_build.py

# the operator benchmark: cuda and triton against naive PyTorch and the copy ceiling, up to 2**30 elements
step opbench 150 ops.log "$PY" benchmarks/opbench.py --device cuda --min-exp 20 --max-exp 30 --step 2 \
  --json "$OUT/ops-cuda.json" --plot "$OUT/roofline-cuda.png"

# the driver on the GPU (default device cuda): gpu, cpu (pinned host memory) and disk tiers give the same
# bytes; device maps over the GPU and the CPU
step driver-tests 120 driver.log "$PY" -m pytest -q -x tests/test_evolve.py -k "same_seed or sequence_classification or device_map"

# one generation of five 1B-shaped models: peak GPU memory and time, ours and the reference code's data flow;
# then ours on the cpu tier without the host-to-device double buffering, to see what the overlap buys
step e2e 120 e2e.log "$PY" benchmarks/e2e_memory.py --device cuda --size 1b --n 5 --json "$OUT/e2e-cuda.json"
step e2e-no-staging 75 e2e-nostaging.log env EVOLVER_STAGING=0 "$PY" benchmarks/e2e_memory.py --device cuda \
  --size 1b --n 5 --modes ours --json "$OUT/e2e-cuda-nostaging.json"

# the fused merge operator against stacking (pytest-benchmark, 5 bf16 inputs of 2**22)
step merge-bench 60 merge-bench.log "$PY" -m pytest -q benchmarks/test_bench_ops.py -k merge \
  --benchmark-columns=median --benchmark-json "$OUT/merge-bench.json"

echo
echo "== summary ($(( $(date +%s) - T0 ))s)"
cat "$OUT/machine.txt" | tail -2
cat "$SUMMARY"
grep -E "passed|failed|error" "$OUT/tests.log" "$OUT/driver.log" 2>/dev/null | tail -2
grep -E "test_merge_tensors\[" "$OUT/merge-bench.log" 2>/dev/null | head -8
grep -E "^\| ours|^\| reference" "$OUT/e2e.log" "$OUT/e2e-nostaging.log" 2>/dev/null
echo "| device | dtype | strategy | numel | impl | ms (median) | GB/s | of copy | vs naive | extra MiB |"
grep -E "^\| cuda " "$OUT/ops.log" 2>/dev/null | grep -E "2\^(28|30) " | grep -vE "\| naive \|"
exit 0  # the summary above carries each step's status
