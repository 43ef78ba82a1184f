"""The random-stream contract (docs/ARCHITECTURE.md §2): masks bitwise equal across backends, independent
of chunking, 64-bit offsets, the threshold's edge values, and the selection rate."""

import math

import pytest
import torch
from conftest import KERNEL_CASES

import evolver_kernels as ek
from evolver_kernels.kernels import rng
from evolver_kernels.kernels.reference import crossover_mask_reference

ODD_SIZES = [1, 3, 4, 5, 4097, 1_000_003]
CRS = [0.0, 1.0, 0.5, 2.0**-32, 1e-9, 0.1, 0.999999, 1.0 - 2.0**-32, 1.0 - 2.0**-40]


def test_reference_mask_follows_the_counter_layout():
    """Element j takes word j & 3 of Philox((j >> 2) lo, hi, stream lo, hi; seed lo, hi)."""
    seed, stream = 0x0123456789ABCDEF, 0xFEDCBA9876543210
    offset = (1 << 36) + 6  # q spans the 2**32 boundary of its low word
    words = rng.random_words(11, seed=seed, stream=stream, offset=offset)
    for k in range(11):
        j = offset + k
        q = j >> 2
        out = rng.philox4x32_10(
            *[torch.tensor(v) for v in (q & rng.MASK32, q >> 32, stream & rng.MASK32, stream >> 32)],
            seed & rng.MASK32,
            seed >> 32,
        )
        assert int(words[k]) == int(out[j & 3])


def test_threshold_is_floor_of_cr_times_2_pow_32():
    assert rng.crossover_threshold(0.0) == 0
    assert rng.crossover_threshold(1.0) == 2**32
    assert rng.crossover_threshold(0.5) == 2**31
    assert rng.crossover_threshold(2.0**-32) == 1
    assert rng.crossover_threshold(1e-10) == 0
    assert rng.crossover_threshold(1.0 - 2.0**-32) == 2**32 - 1


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("numel", ODD_SIZES)
def test_masks_bitwise_equal_over_sizes(device, backend, numel):
    for seed, stream, offset in [(0, 0, 0), (2**64 - 1, 2**64 - 1, 3), (123456789, 7, 2**32 + 1)]:
        want = crossover_mask_reference(numel, CR=0.37, seed=seed, stream=stream, offset=offset, device=device)
        got = ek.crossover_mask(numel, CR=0.37, seed=seed, stream=stream, offset=offset, device=device, backend=backend)
        assert torch.equal(got, want), (seed, stream, offset)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_masks_bitwise_equal_over_seeds_streams_and_crs(device, backend):
    gen = torch.Generator().manual_seed(0)
    for case in range(40):
        seed = int(torch.randint(0, 2**62, (1,), generator=gen)) * 3 + case
        stream = [0, 1, 2**32, 2**63 + 5][case % 4]
        CR = CRS[case % len(CRS)]
        offset = int(torch.randint(0, 2**40, (1,), generator=gen))
        want = crossover_mask_reference(1029, CR=CR, seed=seed, stream=stream, offset=offset, device=device)
        got = ek.crossover_mask(1029, CR=CR, seed=seed, stream=stream, offset=offset, device=device, backend=backend)
        assert torch.equal(got, want), (seed, stream, CR, offset)


@pytest.mark.parametrize("backend", ["reference"] + [c.values[1] for c in KERNEL_CASES if c.values[0] == "cpu"])
def test_cr_edges_select_none_or_all(backend):
    assert not ek.crossover_mask(4099, CR=0.0, seed=5, backend=backend).any()
    assert ek.crossover_mask(4099, CR=1.0, seed=5, backend=backend).all()


@pytest.mark.parametrize("device,backend", KERNEL_CASES + [pytest.param("cpu", "reference", id="cpu-reference")])
def test_chunked_calls_with_offsets_equal_one_call(device, backend):
    numel, base_offset = 50_001, 2**32 - 7_000  # the pieces straddle 2**32
    whole = ek.crossover_mask(numel, CR=0.6, seed=99, stream=3, offset=base_offset, device=device, backend=backend)
    cuts = [0, 1, 2, 7, 4096, 4101, 33_333, numel]
    pieces = [
        ek.crossover_mask(hi - lo, CR=0.6, seed=99, stream=3, offset=base_offset + lo, device=device, backend=backend)
        for lo, hi in zip(cuts[:-1], cuts[1:])
    ]
    assert torch.equal(torch.cat(pieces), whole)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("offset", [2**32, 2**32 - 1, 2**34 + 3, 2**61 - 4096])
def test_offsets_past_2_pow_32(device, backend, offset):
    want = crossover_mask_reference(8191, CR=0.25, seed=17, stream=1, offset=offset, device=device)
    got = ek.crossover_mask(8191, CR=0.25, seed=17, stream=1, offset=offset, device=device, backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("CR", [0.01, 0.25, 0.5, 0.9])
def test_selection_rate_within_5_sigma(CR):
    n = 1_000_003
    for backend in ["reference"] + [c.values[1] for c in KERNEL_CASES if c.values[0] == "cpu"]:
        rate = ek.crossover_mask(n, CR=CR, seed=2024, backend=backend).double().mean().item()
        sigma = math.sqrt(CR * (1 - CR) / n)
        assert abs(rate - CR) < 5 * sigma, (backend, rate)


def test_streams_and_seeds_give_independent_masks():
    m = [ek.crossover_mask(100_000, CR=0.5, seed=s, stream=t) for s, t in [(1, 0), (2, 0), (1, 1)]]
    for i in range(3):
        for j in range(i + 1, 3):
            agreement = (m[i] == m[j]).double().mean().item()
            assert abs(agreement - 0.5) < 5 * math.sqrt(0.25 / 100_000)
