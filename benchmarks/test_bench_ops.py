"""pytest-benchmark view of the operator benchmark (same cases and implementations as opbench.py).

    python -m pytest benchmarks/test_bench_ops.py --benchmark-only --benchmark-group-by=param:numel

Each benchmark's extra_info holds GB/s and the bytes allocated beyond `out`; opbench.py is the one-command
table with the copy ceiling and the speed-ups.
"""

import pytest
import torch
from opbench import DTYPES, Case, extra_bytes, op_fn

import evolver_kernels as ek

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["naive"] + [
    b for b in ek.available_backends(DEVICE) if b not in ("reference", "triton" if DEVICE == "cpu" else "")
]
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


MERGE_METHODS = {
    "average": {},
    "task_arithmetic": {"base": True, "normalize": False},
    "ties": {"base": True, "trim": 0.5},
    "dare_ties": {"base": True, "trim": 0.5, "drop_p": 0.3},
}


def _naive_merge_op(xs, base, trim, drop_p, normalize):
    """What a user writes for the same merge with torch ops: stack, bernoulli mask, where, sign election."""
    stacked = torch.stack(xs).float()
    if base is not None:
        stacked = stacked - base.float()
    if drop_p:
        stacked = stacked * torch.bernoulli(torch.full_like(stacked, 1 - drop_p)) / (1 - drop_p)
    if trim is None:
        merged = stacked.mean(0) if normalize else stacked.sum(0)
    else:
        stacked = torch.where(stacked.abs() < trim, 0.0, stacked)
        sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        agree = stacked.sign() == sign
        merged = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    return (merged + base.float() if base is not None else merged).to(xs[0].dtype)


@pytest.mark.parametrize("method", list(MERGE_METHODS))
@pytest.mark.parametrize("impl", IMPLS)
def test_merge_tensors(benchmark, impl, method):
    """A fused merge of 5 bf16 models' 2^22-element chunk against the stacking equivalent."""
    n, numel = 5, 2**22
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(numel, generator=gen).bfloat16().to(DEVICE) for _ in range(n)]
    spec = MERGE_METHODS[method]
    base = torch.randn(numel, generator=gen).bfloat16().to(DEVICE) if spec.get("base") else None
    trim, drop_p, normalize = spec.get("trim"), spec.get("drop_p", 0.0), spec.get("normalize", True)
    out = torch.empty_like(xs[0])
    if impl == "naive":

        def fn():
            return _naive_merge_op(xs, base, trim, drop_p, normalize)
    else:

        def fn():
            return ek.merge_tensors(
                xs,
                base=base,
                trim=[trim] * n if trim else None,
                drop_p=drop_p,
                normalize=normalize,
                out=out,
                backend=impl,
            )

    if DEVICE == "cuda":
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()

    benchmark.extra_info["extra_bytes"] = extra_bytes(fn, DEVICE, numel * 2, impl == "naive")
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    moved = (n + 1 + (base is not None)) * numel * 2
    benchmark.extra_info["GB/s"] = moved / benchmark.stats.stats.median / 1e9
