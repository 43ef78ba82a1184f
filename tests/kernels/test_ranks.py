"""della's rank drops (kernels/ranks.py): the CPU extension's kernel drops exactly the elements della_kept's formula
drops (a stable argsort's ranks and the contract's words), on odd row lengths, every dtype, with and without a base,
at any global offset, with ties, zeros, NaN and infinities, magnitudes over many binades, and chunk by chunk; the
torch path (GPUs, no extension) gives the formula's thresholds."""

import pytest
import torch

from evolver_kernels.kernels import backends, drop_bits, ranks
from evolver_kernels.kernels.rng import random_words
from evolver_kernels.methods.della import della_kept, della_table, della_thresholds

pytestmark = pytest.mark.skipif(backends.cpu_extension() is None, reason="the CPU extension is not built")

SEED, STREAM = 7, 9


def _rows(kind: str, rows: int, cols: int, dtype: torch.dtype, gen: torch.Generator):
    """(x, base) of rows * cols elements: task vectors of a kind the bucketing must survive."""
    n = rows * cols
    base = (torch.randn(n, generator=gen) * 0.02).to(dtype)
    if kind == "fine-tune":  # bf16 task vectors tie often: few distinct magnitudes per binade
        x = (base.float() + 0.01 * torch.randn(n, generator=gen)).to(dtype)
    elif kind == "tied":  # a base of unit scale: its ulp quantises the task vectors to a few magnitudes per row
        base = torch.randn(n, generator=gen).to(dtype)
        x = (base.float() + 0.01 * torch.randn(n, generator=gen)).to(dtype)
    elif kind == "binades":  # magnitudes from 1e-30 to 1e3: more than the kernel's 16 binades of buckets
        x = (base.float() + torch.randn(n, generator=gen).sign() * 10 ** (torch.rand(n, generator=gen) * 33 - 30)).to(
            dtype
        )
    else:  # "specials": zeros (x == base), a NaN, infinities, -0.0, and long runs of one value
        x = torch.randn(n, generator=gen).to(dtype)
        x[::3] = base[::3]
        if n > 1:
            x[1::7] = x[1]
        if n > 10:
            x[5], x[7], x[9] = float("nan"), float("inf"), -0.0
    return x, base


def _kept(x, base, rows, cols, density, epsilon, offset):
    thresholds = ranks.rank_drop_thresholds(
        x, base, della_table(cols, density, epsilon), seed=SEED, stream=STREAM, offset=offset
    )
    return random_words(rows * cols, seed=SEED, stream=STREAM, offset=offset) >= thresholds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["fine-tune", "tied", "binades", "specials"])
@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (3, 1), (1, 7), (5, 13), (17, 2049), (3, 5000)])
@pytest.mark.parametrize("with_base", [False, True])
def test_native_drops_are_the_formulas(dtype, kind, rows, cols, with_base):
    gen = torch.Generator().manual_seed(rows * 7919 + cols)
    x, base = _rows(kind, rows, cols, dtype, gen)
    base = base if with_base else None
    tau = (x.float() - base.float() if with_base else x.float()).view(rows, cols)
    for density, epsilon in [(0.5, 0.15), (0.2, 0.19), (0.9, 0.05)]:
        for offset in (0, 3, 12_345):
            expected = della_kept(tau, density, epsilon, seed=SEED, stream=STREAM, offset=offset).view(-1)
            assert torch.equal(_kept(x, base, rows, cols, density, epsilon, offset), expected)


def test_chunks_of_whole_rows_drop_what_the_whole_does():
    gen = torch.Generator().manual_seed(3)
    rows, cols = 40, 333
    x, base = _rows("fine-tune", rows, cols, torch.bfloat16, gen)
    whole = _kept(x, base, rows, cols, 0.4, 0.1, 1000)
    for r0 in range(0, rows, 7):
        r1 = min(rows, r0 + 7)
        lo, hi = r0 * cols, r1 * cols
        part = _kept(x[lo:hi], base[lo:hi], r1 - r0, cols, 0.4, 0.1, 1000 + lo)
        assert torch.equal(part, whole[lo:hi])


@pytest.mark.parametrize("kind", ["tied", "binades", "specials"])
@pytest.mark.parametrize(("rows", "cols", "offset"), [(5, 13, 3), (17, 2049, 0), (3, 5000, 12_345)])
def test_the_drops_as_bits_are_the_thresholds_drops(monkeypatch, kind, rows, cols, offset):
    gen = torch.Generator().manual_seed(rows + cols)
    x, base = _rows(kind, rows, cols, torch.bfloat16, gen)
    table = della_table(cols, 0.5, 0.15)
    dropped = ~_kept(x, base, rows, cols, 0.5, 0.15, offset)
    native = ranks.rank_drop_bits(x, base, table, seed=SEED, stream=STREAM, offset=offset)
    assert torch.equal(drop_bits.unpack_drops(native, rows * cols), dropped)
    parts = [  # row spans whose bits start within a byte: the bytes they share are or-ed, not overwritten
        ranks.rank_drop_bits(
            x[r0 * cols : r1 * cols],
            base[r0 * cols : r1 * cols],
            table,
            seed=SEED,
            stream=STREAM,
            offset=offset + r0 * cols,
        )
        for r0, r1 in ((0, 1), (1, rows))
    ]
    joined = torch.cat([drop_bits.unpack_drops(p, n) for p, n in zip(parts, (cols, (rows - 1) * cols))])
    assert torch.equal(joined, dropped)
    monkeypatch.setattr(ranks, "native_magnitudes", lambda x, base: False)
    assert torch.equal(ranks.rank_drop_bits(x, base, table, seed=SEED, stream=STREAM, offset=offset), native)
    with pytest.raises(ValueError, match="out: 3 torch.uint8"):
        ranks.rank_drop_bits(x, base, table, seed=SEED, stream=STREAM, offset=0, out=torch.zeros(3, dtype=torch.uint8))


def test_the_torch_path_gives_the_formulas_thresholds(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    x, base = _rows("specials", 6, 101, torch.float32, gen)
    monkeypatch.setattr(ranks, "native_magnitudes", lambda x, base: False)
    got = ranks.rank_drop_thresholds(x, base, della_table(101, 0.5, 0.15), seed=SEED, stream=STREAM, offset=0)
    assert torch.equal(got, della_thresholds((x - base).view(6, 101), 0.5, 0.15).view(-1))


def test_bad_arguments_are_refused():
    x, table = torch.randn(12), della_table(4, 0.5, 0.15)
    out = torch.empty(12, dtype=torch.int64)
    op = torch.ops.evolver_kernels.magnitude_rank_drops_
    with pytest.raises(RuntimeError, match="whole rows of table's length"):
        op(x, None, della_table(5, 0.5, 0.15), 0, 0, 0, out)
    with pytest.raises(RuntimeError, match="table must be non-increasing"):
        op(x, None, table.flip(0), 0, 0, 0, out)
    with pytest.raises(RuntimeError, match="out must be a contiguous int64 tensor"):
        op(x, None, table, 0, 0, 0, torch.empty(12, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="base must be a contiguous tensor of x's dtype"):
        op(x, torch.randn(11), table, 0, 0, 0, out)
    with pytest.raises(ValueError, match="not whole rows of 5"):
        ranks.rank_drop_thresholds(x, None, della_table(5, 0.5, 0.15), seed=0, stream=0, offset=0)
