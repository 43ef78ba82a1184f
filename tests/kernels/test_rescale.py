"""della's rescale norms (kernels/rescale.py): the CPU extension's kernel gives the formula's L1 norms (fp32
magnitudes, fp64 sums, the kept ones those whose Philox word reaches their threshold) on odd sizes, offsets that
cut Philox groups, every dtype, with and without a base, one threshold or one per element; chunked calls add up to
the whole; the drop bits it records expand to thresholds that drop exactly what it dropped; the torch path agrees."""

import pytest
import torch

from evolver_kernels.kernels import backends, drop_bits, rescale
from evolver_kernels.kernels.rng import random_words

pytestmark = pytest.mark.skipif(backends.cpu_extension() is None, reason="the CPU extension is not built")

TWO_32 = 1 << 32


def _inputs(n: int, dtype: torch.dtype, with_base: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=gen) * 0.02).to(dtype) if with_base else None
    tau = torch.randn(n, generator=gen) * 10 ** (torch.rand(n, generator=gen) * 6 - 4)
    x = (tau if base is None else base.float() + tau).to(dtype)
    if base is not None:
        x[::7] = base[::7]  # zeros of the task vector
    thresholds = torch.randint(0, TWO_32 + 1, (n,), generator=gen, dtype=torch.int64)
    thresholds[::5] = 0  # kept whatever the word
    thresholds[1::5] = TWO_32  # dropped whatever the word
    return x, base, thresholds


def _formula(x, base, thresholds, seed, stream, offset):
    magnitude = (x.float() - base.float() if base is not None else x.float()).abs()
    words = random_words(x.numel(), seed=seed, stream=stream, offset=offset)
    dropped = words < thresholds.expand(x.numel())
    kept = torch.where(dropped, torch.zeros(()), magnitude)
    return torch.stack([magnitude.double().sum(), kept.double().sum()]), dropped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 255, 257, 70_001])
@pytest.mark.parametrize("offset", [0, 3, 1021])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("one_threshold", [False, True])
def test_native_norms_and_bits_are_the_formulas(dtype, n, offset, with_base, one_threshold):
    x, base, thresholds = _inputs(n, dtype, with_base, n + offset)
    if one_threshold:
        thresholds = torch.tensor([3 << 30])
    sums = torch.zeros(2, dtype=torch.float64)
    packed = torch.zeros(drop_bits.packed_size(n), dtype=torch.uint8)
    rescale.add_dropped_l1(sums, x, base, thresholds, seed=11, stream=5, offset=offset, packed=packed)
    want, dropped = _formula(x, base, thresholds, 11, 5, offset)
    torch.testing.assert_close(sums, want, rtol=1e-12, atol=0)
    assert 0 < int(dropped.sum()) < n or n < 10  # both kinds occur
    assert torch.equal(drop_bits.expand_drops(packed, n), dropped.long() << 32)


def test_chunked_calls_add_up_to_the_whole():
    x, base, thresholds = _inputs(100_003, torch.bfloat16, True, 3)
    whole = torch.zeros(2, dtype=torch.float64)
    rescale.add_dropped_l1(whole, x, base, thresholds, seed=2, stream=9, offset=17)
    parts = torch.zeros(2, dtype=torch.float64)
    bits = []
    for lo, hi in ((0, 1), (1, 4099), (4099, 77_777), (77_777, 100_003)):
        packed = torch.zeros(drop_bits.packed_size(hi - lo), dtype=torch.uint8)
        rescale.add_dropped_l1(
            parts, x[lo:hi], base[lo:hi], thresholds[lo:hi], seed=2, stream=9, offset=17 + lo, packed=packed
        )
        bits.append(drop_bits.expand_drops(packed, hi - lo))
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=0)
    _, dropped = _formula(x, base, thresholds, 2, 9, 17)
    assert torch.equal(torch.cat(bits), dropped.long() << 32)


def test_threads_do_not_change_the_sums():
    x, base, thresholds = _inputs(1 << 20, torch.float32, True, 4)
    got = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            sums = torch.zeros(2, dtype=torch.float64)
            rescale.add_dropped_l1(sums, x, base, thresholds, seed=1, stream=1, offset=0)
            got.append(sums)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0], got[1])  # the blocks' sums are added in index order


def test_non_finite_magnitudes_propagate_as_torch_sums_them():
    x, base, thresholds = _inputs(1000, torch.float32, True, 5)
    x[10] = float("inf")
    sums = torch.zeros(2, dtype=torch.float64)
    rescale.add_dropped_l1(sums, x, base, thresholds, seed=1, stream=1, offset=0)
    want, _ = _formula(x, base, thresholds, 1, 1, 0)
    assert torch.equal(sums.isinf(), want.isinf())
    x[20] = float("nan")
    sums.zero_()
    rescale.add_dropped_l1(sums, x, base, thresholds, seed=1, stream=1, offset=0)
    assert bool(sums[0].isnan())


def test_the_torch_path_is_the_kernels(monkeypatch):
    x, base, thresholds = _inputs(5003, torch.bfloat16, True, 6)
    native, native_bits = (
        torch.zeros(2, dtype=torch.float64),
        torch.zeros(drop_bits.packed_size(5003), dtype=torch.uint8),
    )
    rescale.add_dropped_l1(native, x, base, thresholds, seed=3, stream=4, offset=5, packed=native_bits)
    expanded = drop_bits.expand_drops(native_bits, 5003)
    monkeypatch.setattr(rescale, "native_magnitudes", lambda x, base: False)
    monkeypatch.setattr(drop_bits, "native_bits", lambda packed: False)
    sums, bits = torch.zeros(2, dtype=torch.float64), torch.zeros(drop_bits.packed_size(5003), dtype=torch.uint8)
    rescale.add_dropped_l1(sums, x, base, thresholds, seed=3, stream=4, offset=5, packed=bits)
    torch.testing.assert_close(sums, native, rtol=1e-12, atol=0)
    assert torch.equal(bits, native_bits)
    assert torch.equal(drop_bits.expand_drops(bits, 5003), expanded)


@pytest.mark.parametrize("native", [True, False])
def test_drops_decided_as_bits_give_the_thresholds_sums(monkeypatch, native):
    x, base, thresholds = _inputs(10_007, torch.bfloat16, True, 7)
    want = torch.zeros(2, dtype=torch.float64)
    packed = torch.zeros(drop_bits.packed_size(10_007), dtype=torch.uint8)
    rescale.add_dropped_l1(want, x, base, thresholds, seed=3, stream=4, offset=5, packed=packed)
    if not native:
        monkeypatch.setattr(rescale, "native_magnitudes", lambda x, base: False)
    got = torch.zeros(2, dtype=torch.float64)
    rescale.add_dropped_l1(got, x, base, packed, seed=99, stream=98, offset=97)  # the bits decide: no words drawn
    if native:
        assert torch.equal(got, want)  # the same blocks, summed in the same order
    else:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="thresholds: 3 torch.uint8 given for 10007 elements"):
        rescale.add_dropped_l1(got, x, base, packed[:3], seed=0, stream=0, offset=0)


def test_bad_arguments_are_refused():
    x = torch.randn(10)
    sums = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="thresholds: 3 torch.int64 given for 10 elements"):
        rescale.add_dropped_l1(sums, x, None, torch.zeros(3, dtype=torch.int64), seed=0, stream=0, offset=0)
    with pytest.raises(ValueError, match="packed: 3 bytes for 10 elements, expected 2"):
        drop_bits.expand_drops(torch.zeros(3, dtype=torch.uint8), 10)
    op = torch.ops.evolver_kernels.dropped_l1_
    one = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="sums must be a contiguous float64 tensor of 2"):
        op(x, None, one, 0, 0, 0, torch.zeros(2), None)
    with pytest.raises(RuntimeError, match="packed must be a contiguous uint8 tensor"):
        op(x, None, one, 0, 0, 0, sums, torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="base must be a contiguous tensor of x's dtype"):
        op(x, torch.randn(10).bfloat16(), one, 0, 0, 0, sums, None)
    with pytest.raises(RuntimeError, match="offset must be non-negative"):
        op(x, None, one, 0, 0, -1, sums, None)
