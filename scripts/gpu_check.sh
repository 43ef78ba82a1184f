#!/usr/bin/env bash
# One prepared run for a lent GPU machine (no package registry there; its python3 has torch, triton,
# transformers). Builds the CUDA extension, runs the GPU tests and the GPU benchmarks, writes everything
# under $OUT (default ./gpu_out) and prints a short table last.
#   device: bash scripts/gpu_check.sh          (timeout ~540 s leaves room for one rerun)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
cd "$ROOT"
PY="${PYTHON:-python3}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  git rev-parse --short HEAD 2>/dev/null || echo "commit unknown"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

echo "== build"
start=$(date +%s)
EVOLVER_KERNELS_FORCE_CUDA_BUILD=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 \
  "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
build_rc=$?
echo "build rc=$build_rc in $(( $(date +%s) - start )) s"; tail -3 "$OUT/build.log"

echo "== GPU tests"
timeout 240 "$PY" -m pytest -q -x tests/test_philox.py tests/test_crossover_mask.py tests/test_de_mutate_crossover.py \
  tests/test_merge_tensors.py tests/test_large_gpu.py tests/test_build.py > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -5 "$OUT/tests.log"
# the driver on the GPU (default device cuda): gpu, cpu (pinned host memory) and disk tiers give the same bytes
timeout 150 "$PY" -m pytest -q -x tests/test_evolve.py -k "same_seed or sequence_classification or device_map" > "$OUT/driver.log" 2>&1
driver_rc=$?
tail -3 "$OUT/driver.log"

echo "== operator benchmark"
timeout 200 "$PY" benchmarks/opbench.py --device cuda --min-exp 20 --max-exp 30 --step 2 \
  --json "$OUT/ops-cuda.json" --plot "$OUT/roofline-cuda.png" > "$OUT/ops.log" 2>&1
ops_rc=$?

echo "== fused merge against stacking (pytest-benchmark, 5 bf16 inputs of 2^22)"
timeout 90 "$PY" -m pytest -q benchmarks/test_bench_ops.py -k merge --benchmark-columns=median \
  --benchmark-json "$OUT/merge-bench.json" > "$OUT/merge-bench.log" 2>&1
merge_rc=$?

echo "== end-to-end memory (1b-shaped, N=5)"
timeout 120 "$PY" benchmarks/e2e_memory.py --device cuda --size 1b --n 5 --json "$OUT/e2e-cuda.json" > "$OUT/e2e.log" 2>&1
e2e_rc=$?
# what the host-to-device double buffering buys on the cpu tier: the same generation without it
EVOLVER_STAGING=0 timeout 90 "$PY" benchmarks/e2e_memory.py --device cuda --size 1b --n 5 --modes ours \
  --json "$OUT/e2e-cuda-nostaging.json" > "$OUT/e2e-nostaging.log" 2>&1

echo
echo "build rc=$build_rc tests rc=$tests_rc driver rc=$driver_rc ops rc=$ops_rc merge rc=$merge_rc e2e rc=$e2e_rc"
grep -E "test_merge_tensors\[" "$OUT/merge-bench.log" | head -12
grep -E "^\| (device|cuda) " "$OUT/ops.log" | grep -E "2\^(28|30) " | head -40
tail -6 "$OUT/e2e.log"
echo "without staging:"; grep -E "^\| ours" "$OUT/e2e-nostaging.log"
