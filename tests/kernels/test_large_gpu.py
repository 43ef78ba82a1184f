"""64-bit indexing on a real GPU: a tensor of more than 2**31 elements (4.3 GB in bf16 per tensor)."""

import pytest
import torch
from _util import assert_bitwise_equal
from conftest import KERNEL_CASES

import evolver_kernels as ek
from evolver_kernels.kernels.reference import de_mutate_crossover_reference


def _skip_unless_free(nbytes: int) -> None:
    """Skips, saying how much is missing, unless the GPU has `nbytes` free plus 1 GiB for the references."""
    free, _ = torch.cuda.mem_get_info()
    if free < nbytes + (1 << 30):
        pytest.skip(f"needs {nbytes / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", [c.values[1] for c in KERNEL_CASES if c.values[0] == "cuda"])
def test_more_than_2_pow_31_elements(backend):
    n = 2**31 + 4099
    _skip_unless_free(3 * 2 * n)
    x = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    a = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    out = ek.de_mutate_crossover(x, x, a, x, F=0.5, CR=0.5, seed=3, backend=backend)
    for lo in (0, 2**31 - 1000, n - 5000):
        hi = min(lo + 5000, n)
        want = de_mutate_crossover_reference(x[lo:hi], x[lo:hi], a[lo:hi], x[lo:hi], F=0.5, CR=0.5, seed=3, offset=lo)
        assert_bitwise_equal(out[lo:hi], want, f"slice at {lo}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", [c.values[1] for c in KERNEL_CASES if c.values[0] == "cuda"])
def test_merge_more_than_2_pow_31_elements(backend):
    from evolver_kernels.kernels.reference import merge_reference

    n = 2**31 + 4099
    _skip_unless_free(4 * 2 * n)
    base = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    xs = [torch.randn(n, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    kw = dict(weights=[1.0, 2.0], trim=[0.3, 0.1], drop_p=0.25, seed=5, stream=7)
    out = ek.merge_tensors(xs, base=base, backend=backend, **kw)
    for lo in (0, 2**31 - 1000, n - 5000):
        hi = min(lo + 5000, n)
        want = merge_reference([x[lo:hi] for x in xs], base=base[lo:hi], offset=lo, **kw)
        assert_bitwise_equal(out[lo:hi], want, f"slice at {lo}")
