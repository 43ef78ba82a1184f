"""Philox4x32-10 in PyTorch, the crossover threshold and seed derivation (docs/ARCHITECTURE.md §2).

This is the PyTorch definition of the generator; csrc/philox.h is the C++ one (host and device) and
evolver_kernels/kernels/triton/common.py the Triton one. All three are held to KNOWN_ANSWERS by the tests.

Words are carried in int64 tensors holding values in [0, 2**32), so every backend of PyTorch (which
has no full uint32 arithmetic) computes them exactly.
"""

from __future__ import annotations

import math

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
UINT64_LIMIT = 1 << 64

# (counter c0..c3, key k0 k1) -> output words: Random123's known-answer vectors for Philox4x32-10.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

# Stream tags: each consumer of random bits draws from its own stream, so they never share words.
STREAM_CROSSOVER = 0
STREAM_SEED_DERIVATION = 0x5EED
STREAM_DARE = 0xDA7E


def _mul_hi_lo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a * m) >> 32 and (a * m) & MASK32 for a in [0, 2**32), without int64 overflow."""
    p_lo = (a & 0xFFFF) * m  # < 2**48
    p_hi = (a >> 16) * m  # < 2**48
    s = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2**49
    return (p_hi >> 16) + (s >> 32), s & MASK32


def philox4x32_10(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors of 32-bit counters (broadcast together); key (k0, k1) as ints."""
    for _ in range(10):
        hi0, lo0 = _mul_hi_lo(c0, PHILOX_M0)
        hi1, lo1 = _mul_hi_lo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def crossover_threshold(CR: float) -> int:
    """T = floor(CR * 2**32): element j is selected when its 32-bit word is < T (CR=0: none, CR=1: all)."""
    return math.floor(float(CR) * 4294967296.0)


def random_words(
    numel: int, *, seed: int, stream: int = 0, offset: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The contract's 32-bit word of each element offset .. offset + numel - 1, as int64 [numel].

    Allocates several tensors of numel elements: this is the oracle, not a kernel.
    """
    j = torch.arange(numel, dtype=torch.int64, device=device) + offset
    q = j >> 2
    zeros = torch.zeros((), dtype=torch.int64, device=device)
    words = philox4x32_10(
        q & MASK32, q >> 32, zeros + (stream & MASK32), zeros + (stream >> 32), seed & MASK32, seed >> 32
    )
    lane = j & 3
    out = words[3]
    for w in (2, 1, 0):
        out = torch.where(lane == w, words[w], out)
    return out


def derive_seed(run_seed: int, *path: int) -> int:
    """A 64-bit seed for one consumer (e.g. generation g, individual i) from the run seed.

    Words 0 and 1 of Philox with key (run_seed lo, run_seed hi) and counter (path[0], path[1], path[2],
    STREAM_SEED_DERIVATION): up to three non-negative 32-bit path components, so each (generation,
    individual, purpose) gets an independent seed and a run is reproducible from its config alone.
    """
    if not 0 <= run_seed < UINT64_LIMIT:
        raise ValueError(f"run_seed must be in [0, 2**64), got {run_seed}")
    if len(path) > 3 or any(not 0 <= p <= MASK32 for p in path):
        raise ValueError(f"derive_seed takes up to three path components in [0, 2**32), got {path}")
    counter = list(path) + [0] * (3 - len(path))
    c = [torch.tensor(v, dtype=torch.int64) for v in counter + [STREAM_SEED_DERIVATION]]
    w = philox4x32_10(*c, run_seed & MASK32, run_seed >> 32)
    return int(w[0]) | (int(w[1]) << 32)


STREAM_ORDER = 0x0DE5

# Purposes (the third path component of derive_seed / random_order) of the driver's random choices.
PURPOSE_VISIT_ORDER = 1
PURPOSE_PICKS = 2
PURPOSE_OFFSPRING = 3
PURPOSE_MERGE = 4
PURPOSE_SELECT = 5  # --select-fraction's split of the dev files (heldout.py)
PURPOSE_ADAPT = 6  # --adapt's draws of F and CR (adaptation.py)
PURPOSE_RECIPE = 7  # --search recipe: the seed of CMA-ES's normal draws (evolve/recipe.py)


def random_order(run_seed: int, n: int, *path: int) -> list[int]:
    """A permutation of range(n) determined by (run_seed, path): items sorted by a 64-bit Philox key each
    (counter (path[0], path[1], k, STREAM_ORDER)). The same on every machine and torch version."""
    if len(path) > 2 or any(not 0 <= p <= MASK32 for p in path):
        raise ValueError(f"random_order takes up to two path components in [0, 2**32), got {path}")
    counter = list(path) + [0] * (2 - len(path))
    k = torch.arange(n, dtype=torch.int64)
    zeros = torch.zeros(n, dtype=torch.int64)
    w = philox4x32_10(
        zeros + counter[0], zeros + counter[1], k, zeros + STREAM_ORDER, run_seed & MASK32, run_seed >> 32
    )
    keys = [(int(w[0][j]) << 32 | int(w[1][j]), j) for j in range(n)]
    return [j for _, j in sorted(keys)]
