"""What the Triton kernels share: Philox4x32-10 in Triton, the block layout of the random words, bits <-> fp32
(bfloat16 widened and rounded on bits: the interpreter's bf16 arithmetic is not trustworthy) and the host-side
launch arithmetic (64-bit values split into int32 halves: the interpreter's program_id is int32).

Import only after TRITON_INTERPRET is decided: Triton reads it when kernels are defined.

Layout: a program owns GROUPS Philox groups aligned to the global index (4 * GROUPS elements), computes
each group's four words once and lays its elements out as a [GROUPS, 4] block, so the random words never
depend on how the caller chunked the tensor. Tensors travel as integer views of their bits: unselected
elements are stored from the loaded bits (bit for bit, NaN payloads included). Launches pass
enable_fp_fusion=False so a + F * d is two roundings, as in the reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from evolver_kernels.kernels.rng import MASK32

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter pays per program, a GPU wants many programs in flight.
GROUPS_PER_PROGRAM = 4096 if INTERPRETED else 512
NUM_WARPS = 4

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
BITS_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 blocks (c0..c3) with uint32 key (k0, k1)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def join_i64(hi, lo):
    """hi * 2**31 + lo from two int32-typed pieces (a uint32-typed scalar widens wrongly in the interpreter)."""
    return (hi.to(tl.int64) << 31) | lo.to(tl.int64)


@triton.jit
def selects(word, bound, take_all):
    """The contract's word < threshold, as a 32-bit compare plus the threshold == 2**32 flag."""
    return (word < bound.to(tl.uint32)) | (take_all != 0)


@triton.jit
def words_block(pid, offset, k0, k1, s0, s1, GROUPS: tl.constexpr):
    """Global indices [GROUPS, 4] of this program's block and the Philox word of each."""
    q = (offset >> 2) + pid * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    zero = tl.zeros([GROUPS], dtype=tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(
        (q & 0xFFFFFFFF).to(tl.uint32),
        (q >> 32).to(tl.uint32),
        zero + s0.to(tl.uint32),
        zero + s1.to(tl.uint32),
        k0.to(tl.uint32),
        k1.to(tl.uint32),
    )
    lane = tl.arange(0, 4)[None, :]
    word = tl.where(
        lane == 0, w0[:, None], tl.where(lane == 1, w1[:, None], tl.where(lane == 2, w2[:, None], w3[:, None]))
    )
    j = q[:, None] * 4 + lane.to(tl.int64)
    return j, word


@triton.jit
def bits_to_f32(bits, DTYPE: tl.constexpr):
    if DTYPE == 0:
        f = bits.to(tl.float32, bitcast=True)
    elif DTYPE == 1:
        f = (bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        f = bits.to(tl.float16, bitcast=True).to(tl.float32)
    return f


@triton.jit
def f32_to_bits(f, DTYPE: tl.constexpr):
    if DTYPE == 0:
        bits = f.to(tl.int32, bitcast=True)
    elif DTYPE == 1:
        u = f.to(tl.uint32, bitcast=True)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round to nearest even
        quiet_nan = (u >> 16) | 0x40
        bits = tl.where((u & 0x7FFFFFFF) > 0x7F800000, quiet_nan, rounded).to(tl.uint16).to(tl.int16, bitcast=True)
    else:
        bits = f.to(tl.float16).to(tl.int16, bitcast=True)
    return bits


def grid(numel: int, offset: int) -> tuple[int]:
    groups = ((offset + numel + 3) >> 2) - (offset >> 2)
    return (triton.cdiv(groups, GROUPS_PER_PROGRAM),)


def split_seed(v: int) -> tuple[int, int]:
    """(lo, hi) 32-bit words of a 64-bit value: Philox key and stream words."""
    return v & MASK32, v >> 32


def i64_parts(v: int) -> tuple[int, int]:
    """(hi, lo) with v = hi * 2**31 + lo, both below 2**31, for v < 2**62 (see join_i64)."""
    return v >> 31, v & 0x7FFFFFFF


def threshold_args(threshold: int) -> tuple[int, int]:
    """(bound, take_all) for selects."""
    return (0, 1) if threshold > MASK32 else (threshold, 0)
