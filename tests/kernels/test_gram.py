"""The task vectors' Gram matrix (kernels/gram.py): the CPU extension's kernel gives the formula's matrix (each
product rounded in fp32, sums in fp64) on odd sizes, 1 to 6 models, every dtype, with and without a base; it adds
into `out`, chunked calls add up to the whole, threads do not change it, and the torch path agrees."""

import pytest
import torch

from evolver_kernels.kernels import backends, gram

pytestmark = pytest.mark.skipif(backends.cpu_extension() is None, reason="the CPU extension is not built")


def _inputs(n: int, models: int, dtype: torch.dtype, with_base: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=gen) * 0.02).to(dtype) if with_base else None
    xs = []
    for _ in range(models):
        tau = torch.randn(n, generator=gen) * 10 ** (torch.rand(n, generator=gen) * 4 - 3)
        xs.append((tau if base is None else base.float() + tau).to(dtype))
    return xs, base


def _formula(xs, base):
    vs = [x.float() - base.float() if base is not None else x.float() for x in xs]
    return torch.tensor([[float((a * b).double().sum()) for b in vs] for a in vs], dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 511, 513, 70_001])
@pytest.mark.parametrize("models", [1, 2, 3, 6])
@pytest.mark.parametrize("with_base", [False, True])
def test_native_gram_is_the_formulas(dtype, n, models, with_base):
    xs, base = _inputs(n, models, dtype, with_base, n * 10 + models)
    out = torch.full((models, models), 0.5, dtype=torch.float64)
    gram.add_task_vector_gram(out, xs, base)
    torch.testing.assert_close(out - 0.5, _formula(xs, base), rtol=1e-12, atol=1e-12)
    assert torch.equal(out, out.T)


def test_chunks_add_up_and_threads_do_not_change_it():
    xs, base = _inputs(300_001, 4, torch.bfloat16, True, 1)
    whole = torch.zeros(4, 4, dtype=torch.float64)
    gram.add_task_vector_gram(whole, xs, base)
    parts = torch.zeros(4, 4, dtype=torch.float64)
    for lo, hi in ((0, 1), (1, 1000), (1000, 300_001)):
        gram.add_task_vector_gram(parts, [x[lo:hi] for x in xs], base[lo:hi])
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=0)
    threads, got = torch.get_num_threads(), []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            out = torch.zeros(4, 4, dtype=torch.float64)
            gram.add_task_vector_gram(out, xs, base)
            got.append(out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0], got[1])  # the blocks' sums are added in index order


def test_the_torch_path_agrees(monkeypatch):
    xs, base = _inputs(5003, 3, torch.bfloat16, True, 2)
    native = torch.zeros(3, 3, dtype=torch.float64)
    gram.add_task_vector_gram(native, xs, base)
    monkeypatch.setattr(gram, "native_magnitudes", lambda x, base: False)
    fallback = torch.zeros(3, 3, dtype=torch.float64)
    gram.add_task_vector_gram(fallback, xs, base)
    torch.testing.assert_close(fallback, native, rtol=1e-12, atol=0)


def test_bad_arguments_are_refused():
    x = torch.randn(10)
    with pytest.raises(ValueError, match=r"out must be a float64 tensor of shape \[2, 2\]"):
        gram.add_task_vector_gram(torch.zeros(3, 3, dtype=torch.float64), [x, x], None)
    op = torch.ops.evolver_kernels.task_vector_gram_
    with pytest.raises(RuntimeError, match="one dtype and size"):
        op([x, torch.randn(9)], None, torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="out must be a contiguous float64 tensor"):
        op([x], None, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 513, 70_001])
@pytest.mark.parametrize("models", [1, 3, 6])
@pytest.mark.parametrize("select", [None, "median", float("inf")])
def test_native_squares_are_the_formulas(dtype, n, models, select):
    """sce's squares: the selection the fused merge makes (the variance over the models at least `select`)."""
    from evolver_kernels.kernels.variance import task_vector_variance

    xs, base = _inputs(n, models, dtype, True, n + models)
    taus = [x.float() - base.float() for x in xs]
    var = task_vector_variance(taus, None)
    if select == "median":
        select = float(var.median())
    out = torch.full((models,), 0.25, dtype=torch.float64)
    gram.add_task_vector_squares(out, xs, base, select)
    keep = torch.ones(n, dtype=torch.bool) if select is None else var >= select
    want = torch.stack([torch.where(keep, t * t, 0.0).double().sum() for t in taus])
    torch.testing.assert_close(out - 0.25, want, rtol=1e-12, atol=1e-12)
    if select == float("inf"):
        assert torch.equal(out, torch.full((models,), 0.25, dtype=torch.float64))


def test_the_squares_torch_path_agrees(monkeypatch):
    xs, base = _inputs(5003, 4, torch.bfloat16, True, 3)
    native = torch.zeros(4, dtype=torch.float64)
    gram.add_task_vector_squares(native, xs, base, 1e-6)
    monkeypatch.setattr(gram, "native_magnitudes", lambda x, base: False)
    fallback = torch.zeros(4, dtype=torch.float64)
    gram.add_task_vector_squares(fallback, xs, base, 1e-6)
    torch.testing.assert_close(fallback, native, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"out must be a float64 tensor of shape \[4\]"):
        gram.add_task_vector_squares(torch.zeros(3, dtype=torch.float64), xs, base)
