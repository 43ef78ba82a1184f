"""The magnitude histograms (kernels/histogram.py): the CPU extension's kernel counts exactly what torch counts, on
odd sizes, every dtype, with and without a base, by the top 16 bits and within chosen buckets, chunk by chunk."""

import pytest
import torch

from evolver_kernels.kernels import backends
from evolver_kernels.kernels.histogram import BUCKETS, count_into, magnitude_bits, magnitude_histogram

pytestmark = pytest.mark.skipif(backends.cpu_extension() is None, reason="the CPU extension is not built")


def _torch_counts(x, base, slots, size):
    counts = torch.zeros(size, dtype=torch.int64)
    bits = magnitude_bits(x, base)
    if slots is None:
        count_into(counts, bits >> 16)
    else:
        slot = slots[(bits >> 16).long()]
        chosen = slot >= 0
        count_into(counts, slot[chosen].long() * BUCKETS + (bits[chosen] & 0xFFFF).long())
    return counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 65_537, (1 << 20) + 3, 3 << 20])
@pytest.mark.parametrize("with_base", [False, True])
def test_native_counts_are_torchs(dtype, n, with_base):
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=gen) * torch.logspace(-8, 8, n)).to(dtype)
    x[::13] = 0.0
    x[1::17] = -0.0
    base = torch.randn(n, generator=gen).to(dtype) if with_base else None
    if base is not None:
        base[::5] = x[::5]  # task vector 0
    counts = torch.zeros(BUCKETS, dtype=torch.int64)
    magnitude_histogram(counts, x, base)
    assert torch.equal(counts, _torch_counts(x, base, None, BUCKETS))
    assert int(counts.sum()) == n
    highs = sorted(set((magnitude_bits(x, base) >> 16)[:: max(1, n // 3)].tolist()))
    slots = torch.full((BUCKETS,), -1, dtype=torch.int32)
    slots[highs] = torch.arange(len(highs), dtype=torch.int32)
    lows = torch.zeros(len(highs) * BUCKETS, dtype=torch.int64)
    # chunk by chunk into the same counts: the sum of the chunks' histograms
    for lo in range(0, n, 100_003):
        hi = min(n, lo + 100_003)
        magnitude_histogram(lows, x[lo:hi], None if base is None else base[lo:hi], slots)
    assert torch.equal(lows, _torch_counts(x, base, slots, len(highs) * BUCKETS))


def test_bad_arguments_are_refused():
    x = torch.randn(10)
    with pytest.raises(RuntimeError, match="base must be a contiguous tensor of x's dtype"):
        torch.ops.evolver_kernels.magnitude_histogram_(x, torch.randn(9), None, torch.zeros(BUCKETS, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="counts must be"):
        torch.ops.evolver_kernels.magnitude_histogram_(x, None, None, torch.zeros(10, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="dtype must be float32, bfloat16 or float16"):
        torch.ops.evolver_kernels.magnitude_histogram_(x.double(), None, None, torch.zeros(BUCKETS, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_base", [False, True])
def test_native_gather_is_torchs(dtype, with_base):
    """Each window's magnitudes gathered (as a multiset) and those above it counted, chunk by chunk, as torch does,
    for several inputs and several windows of one input in the same pass; a window with more than the room counts
    them all and fills the room."""
    from evolver_kernels.kernels import histogram

    gen = torch.Generator().manual_seed(1)
    n = (1 << 20) + 11
    xs = [torch.randn(n, generator=gen).to(dtype) for _ in range(3)]
    base = torch.randn(n, generator=gen).to(dtype) if with_base else None
    bits = [magnitude_bits(x, base) for x in xs]
    windows = [
        (0, 0x3F000000, 0x3F000000),
        (1, 0x3F000000, 0x3F0FFFFF),
        (2, 0, 0x7FFFFFFF),
        (0, 0x3E000000, 0x3F7FFFFF),
    ]
    inside = [torch.sort(bits[i][(bits[i] >= lo) & (bits[i] <= hi)]).values for i, lo, hi in windows]
    for halve in (False, True):
        rooms = [v.numel() // 2 if halve else v.numel() for v in inside]
        counts = torch.zeros(len(windows), 2, dtype=torch.int64)
        outs = [torch.full((room,), -1, dtype=torch.int32) for room in rooms]
        for a in range(0, n, 300_007):  # chunk by chunk into the same counts
            part = slice(a, a + 300_007)
            histogram.magnitude_gather(
                counts, outs, [x[part] for x in xs], None if base is None else base[part], windows
            )
        for (i, lo, hi), got, want, c in zip(windows, outs, inside, counts):
            assert c.tolist() == [int((bits[i] > hi).sum()), want.numel()]
            if not halve:
                assert torch.equal(torch.sort(got).values, want)
            else:
                assert bool(((got >= lo) & (got <= hi)).all())
