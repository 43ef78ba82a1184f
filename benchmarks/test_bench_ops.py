"""pytest-benchmark view of the operator benchmark (same cases and implementations as opbench.py).

    python -m pytest benchmarks/test_bench_ops.py --benchmark-only --benchmark-group-by=param:numel

Each benchmark's extra_info holds GB/s and the bytes allocated beyond `out`; opbench.py is the one-command
table with the copy ceiling and the speed-ups.
"""

import pytest
import torch

import evolver_kernels as ek
from opbench import DTYPES, Case, extra_bytes, op_fn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["naive"] + [b for b in ek.available_backends(DEVICE) if b not in ("reference", "triton" if DEVICE == "cpu" else "")]
SIZES = [2**16, 2**20, 2**24]


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("strategy", ["evolver", "rand/1"])
@pytest.mark.parametrize("impl", IMPLS)
def test_de_mutate_crossover(benchmark, impl, strategy, dtype, numel):
    case = Case(numel, DTYPES[dtype], strategy, DEVICE)
    fn = op_fn(case, impl)
    if DEVICE == "cuda":
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()

    benchmark.extra_info["extra_bytes"] = extra_bytes(fn, DEVICE, numel * case.out.element_size(), impl == "naive")
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    benchmark.extra_info["GB/s"] = case.bytes_moved / benchmark.stats.stats.median / 1e9
