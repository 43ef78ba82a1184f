"""sce's variance (kernels/variance.py): the CPU extension's kernel gives reference.variance_reference's bits on odd
sizes, 1 to 6 models, every dtype, with and without a base, with ties, zeros, infinities and NaN."""

import pytest
import torch

from evolver_kernels.kernels import backends, variance
from evolver_kernels.kernels.reference import variance_reference

pytestmark = pytest.mark.skipif(backends.cpu_extension() is None, reason="the CPU extension is not built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 255, 257, 70_001])
@pytest.mark.parametrize("models", [1, 2, 3, 6])
@pytest.mark.parametrize("with_base", [False, True])
def test_native_variance_is_the_references(dtype, n, models, with_base):
    gen = torch.Generator().manual_seed(n * 10 + models)
    base = (torch.randn(n, generator=gen) * 0.02).to(dtype) if with_base else None
    xs = []
    for k in range(models):
        x = torch.randn(n, generator=gen) * 10 ** (torch.rand(n, generator=gen) * 6 - 4)
        x = (x if base is None else base.float() + x).to(dtype)
        if base is not None:
            x[k::5] = base[k::5]  # task vectors of zero, some tied across models
        xs.append(x)
    if n > 10:
        xs[0][3], xs[-1][4], xs[0][6] = float("inf"), float("nan"), -0.0
    got = variance.task_vector_variance(xs, base)
    want = variance_reference([x.float() - base.float() if base is not None else x.float() for x in xs])
    assert got.dtype == torch.float32 and got.shape == (n,)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))  # the same bits, zeros' signs too


def test_the_torch_path_is_the_reference(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    xs, base = [torch.randn(300, generator=gen).bfloat16() for _ in range(3)], torch.randn(300).bfloat16()
    native = variance.task_vector_variance(xs, base)
    monkeypatch.setattr(variance, "native_magnitudes", lambda x, base: False)
    assert torch.equal(variance.task_vector_variance(xs, base), native)


def test_bad_arguments_are_refused():
    op = torch.ops.evolver_kernels.task_vector_variance_
    x = torch.randn(10)
    with pytest.raises(RuntimeError, match="one dtype and size"):
        op([x, torch.randn(9)], None, torch.empty(10))
    with pytest.raises(RuntimeError, match="out must be a contiguous float32 tensor"):
        op([x], None, torch.empty(10, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="base must be a contiguous tensor of x's dtype"):
        op([x], torch.randn(10).bfloat16(), torch.empty(10))
