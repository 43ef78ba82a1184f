"""Values of the fused operator against the reference: every dtype, both input patterns (the evolver
strategy's two reads and the general four), odd sizes, chunked calls, in place, and the bits of
unselected elements (NaN payloads, -0.0)."""

import pytest
import torch
from _util import BITS, assert_bitwise_equal, assert_within_one_ulp
from conftest import KERNEL_CASES

import evolver_kernels as ek
from evolver_kernels.kernels.reference import crossover_mask_reference, de_mutate_crossover_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _population(n, dtype, device, seed=0, count=4):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=gen) * 3).to(dtype).to(device) for _ in range(count)]


def _run(backend, x, base, a, b, **kw):
    return ek.de_mutate_crossover(x, base, a, b, backend=backend, **kw)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 3, 4097, 1_000_003])
@pytest.mark.parametrize("strategy", ["evolver", "rand/1"])
def test_values_match_reference(device, backend, dtype, numel, strategy):
    x, r1, r2, r3 = _population(numel, dtype, device, seed=numel)
    args = (x, x, r1, x) if strategy == "evolver" else (r1, r2, r3, x)  # rand/1 writes over a fourth tensor
    kw = dict(F=0.73, CR=0.41, seed=2**63 + 11, stream=5, offset=numel % 5)
    want = de_mutate_crossover_reference(*args, **kw)
    got = _run(backend, *args, **kw)
    assert_within_one_ulp(got, want, f"{backend} {dtype}")
    mask = crossover_mask_reference(numel, CR=0.41, seed=2**63 + 11, stream=5, offset=numel % 5, device=device)
    assert_bitwise_equal(got[~mask], args[0][~mask], "unselected elements")


@pytest.mark.parametrize("device,backend", KERNEL_CASES + [pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_calls_equal_one_call(device, backend, dtype):
    n = 30_011
    x, base, a, b = _population(n, dtype, device, seed=3)
    kw = dict(F=0.5, CR=0.5, seed=42, stream=9)
    offset = 2**32 - 10_000
    whole = _run(backend, x, base, a, b, offset=offset, **kw)
    out = torch.empty_like(x)
    cuts = [0, 5, 4096, 4099, 17_000, n]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        _run(backend, x[lo:hi], base[lo:hi], a[lo:hi], b[lo:hi], offset=offset + lo, out=out[lo:hi], **kw)
    assert_bitwise_equal(out, whole, "chunked")


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_equals_out_of_place(device, backend, dtype):
    x, a = _population(10_007, dtype, device, seed=4, count=2)
    kw = dict(F=0.5, CR=0.5, seed=7, offset=2**33 + 2)
    want = _run(backend, x, x, a, x, **kw)
    y = x.clone()
    got = _run(backend, y, y, a, y, out=y, **kw)
    assert got.data_ptr() == y.data_ptr()
    assert_bitwise_equal(y, want, "in place")


@pytest.mark.parametrize("device,backend", KERNEL_CASES + [pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unselected_bits_survive_including_nan_payloads_and_negative_zero(device, backend, dtype):
    n = 4103
    x, a = _population(n, dtype, device, seed=5, count=2)
    raw = x.view(BITS[dtype])
    nan_payload = 0x7FC00123 if dtype == torch.float32 else (0x7FC1 if dtype == torch.bfloat16 else 0x7E01)
    neg_zero = -(2**31) if dtype == torch.float32 else -(2**15)
    raw[::3] = nan_payload
    raw[1::3] = neg_zero
    got = _run(backend, x, x, a, x, F=0.5, CR=0.3, seed=8)
    mask = crossover_mask_reference(n, CR=0.3, seed=8, device=device)
    assert_bitwise_equal(got[~mask], x[~mask], "unselected")
    assert_within_one_ulp(got, de_mutate_crossover_reference(x, x, a, x, F=0.5, CR=0.3, seed=8), "all")


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_cr_one_mutates_everything_and_cr_zero_copies(device, backend):
    x, base, a, b = _population(1001, torch.float32, device, seed=6)
    got = _run(backend, x, base, a, b, F=0.25, CR=1.0, seed=1)
    want = base + torch.tensor(0.25) * (a - b)
    assert_within_one_ulp(got, want, "CR=1")
    assert_bitwise_equal(_run(backend, x, base, a, b, F=0.25, CR=0.0, seed=1), x, "CR=0")


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_multidimensional_tensors(device, backend):
    x, a = [t.view(37, 3, 11) for t in _population(37 * 33, torch.bfloat16, device, seed=7, count=2)]
    got = _run(backend, x, x, a, x, F=0.5, CR=0.5, seed=3)
    assert got.shape == x.shape
    assert_within_one_ulp(got, de_mutate_crossover_reference(x, x, a, x, F=0.5, CR=0.5, seed=3), "3-d")


def test_default_backend_is_the_fast_one():
    expected = "cpu" if "cpu" in ek.available_backends("cpu") else "reference"
    from evolver_kernels.kernels.backends import resolve_backend

    assert resolve_backend(None, "cpu") == expected


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strategy", ["evolver", "rand/1"])
def test_outputs_that_bypass_the_caches_have_the_same_bits(dtype, strategy):
    """The CPU kernel streams an output of 8 MiB or more past the caches (csrc/cpu/de_cpu.cpp): one such call, out
    of place and in place, odd size and offset, gives the bits of the same op in pieces below that size (plain
    stores), each piece at its global offset."""
    if "cpu" not in ek.available_backends("cpu"):
        pytest.skip("the CPU extension is not built")
    numel = (8 << 20) // dtype.itemsize + 1_001  # past the streaming size, not a whole number of lines
    x, r1, r2, r3 = _population(numel, dtype, "cpu", seed=7)
    base, a, b = (x, r1, x) if strategy == "evolver" else (r1, r2, r3)
    kw = dict(F=0.7, CR=0.6, seed=11, offset=3)
    whole = _run("cpu", x, base, a, b, **kw)
    pieces = torch.empty_like(x)
    step = 1_000_003
    for lo in range(0, numel, step):
        hi = min(numel, lo + step)
        parts = [t[lo:hi] for t in (x, base, a, b)]
        _run("cpu", *parts, F=0.7, CR=0.6, seed=11, offset=3 + lo, out=pieces[lo:hi])
    assert_bitwise_equal(whole, pieces)
    in_place = x.clone()
    _run(
        "cpu",
        in_place,
        in_place if strategy == "evolver" else base,
        a,
        in_place if strategy == "evolver" else b,
        out=in_place,
        **kw,
    )
    assert_bitwise_equal(in_place, whole)
