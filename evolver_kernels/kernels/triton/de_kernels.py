"""Triton kernels of the DE operator: mutation + binomial crossover (de_mutate_crossover), the debug mask
(crossover_mask) and the Philox test hook (philox_block). Arguments are checked by evolver_kernels.kernels.ops."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evolver_kernels.kernels.triton.common import (
    BITS_VIEW,
    DTYPE_CODES,
    GROUPS_PER_PROGRAM,
    NUM_WARPS,
    bits_to_f32,
    f32_to_bits,
    grid,
    i64_parts,
    join_i64,
    philox4x32_10,
    selects,
    split_seed,
    threshold_args,
    words_block,
)

_RUNTIME_INTS = ["numel_hi", "numel_lo", "offset_hi", "offset_lo", "bound", "take_all", "k0", "k1", "s0", "s1"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _de_kernel(
    x_ptr,
    a_ptr,
    base_ptr,
    b_ptr,
    out_ptr,
    numel_hi,
    numel_lo,
    F,
    bound,
    take_all,
    k0,
    k1,
    s0,
    s1,
    offset_hi,
    offset_lo,
    TWO_INPUTS: tl.constexpr,
    DTYPE: tl.constexpr,
    GROUPS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offset = join_i64(offset_hi, offset_lo)
    j, word = words_block(pid, offset, k0, k1, s0, s1, GROUPS)
    p = j - offset
    valid = (p >= 0) & (p < join_i64(numel_hi, numel_lo))
    x_bits = tl.load(x_ptr + p, mask=valid)
    xf = bits_to_f32(x_bits, DTYPE)
    af = bits_to_f32(tl.load(a_ptr + p, mask=valid), DTYPE)
    if TWO_INPUTS:
        r = xf + F * (af - xf)
    else:
        basef = bits_to_f32(tl.load(base_ptr + p, mask=valid), DTYPE)
        bf = bits_to_f32(tl.load(b_ptr + p, mask=valid), DTYPE)
        r = basef + F * (af - bf)
    selected = selects(word, bound, take_all)
    tl.store(out_ptr + p, tl.where(selected, f32_to_bits(r, DTYPE), x_bits), mask=valid)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _mask_kernel(
    out_ptr, numel_hi, numel_lo, bound, take_all, k0, k1, s0, s1, offset_hi, offset_lo, GROUPS: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    offset = join_i64(offset_hi, offset_lo)
    j, word = words_block(pid, offset, k0, k1, s0, s1, GROUPS)
    p = j - offset
    selected = selects(word, bound, take_all)
    tl.store(out_ptr + p, selected.to(tl.uint8), mask=(p >= 0) & (p < join_i64(numel_hi, numel_lo)))


def de_mutate_crossover(
    x: torch.Tensor,
    a: torch.Tensor,
    base: torch.Tensor | None,
    b: torch.Tensor | None,
    out: torch.Tensor,
    *,
    F: float,
    threshold: int,
    seed: int,
    stream: int,
    offset: int,
) -> None:
    """Writes the offspring into `out` (may be x). base = b = None: the evolver strategy, two reads."""
    n = x.numel()
    if n == 0:
        return
    bits = BITS_VIEW[x.dtype]
    two_inputs = base is None and b is None
    base = x if base is None else base
    b = x if b is None else b
    k0, k1 = split_seed(seed)
    s0, s1 = split_seed(stream)
    _de_kernel[grid(n, offset)](
        x.view(bits),
        a.view(bits),
        base.view(bits),
        b.view(bits),
        out.view(bits),
        *i64_parts(n),
        F,
        *threshold_args(threshold),
        k0,
        k1,
        s0,
        s1,
        *i64_parts(offset),
        TWO_INPUTS=two_inputs,
        DTYPE=DTYPE_CODES[x.dtype],
        GROUPS=GROUPS_PER_PROGRAM,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )


def crossover_mask(out: torch.Tensor, *, threshold: int, seed: int, stream: int, offset: int) -> None:
    """Writes the crossover mask of elements offset .. offset + out.numel() - 1 into the bool tensor `out`."""
    n = out.numel()
    if n == 0:
        return
    k0, k1 = split_seed(seed)
    s0, s1 = split_seed(stream)
    _mask_kernel[grid(n, offset)](
        out.view(torch.uint8),
        *i64_parts(n),
        *threshold_args(threshold),
        k0,
        k1,
        s0,
        s1,
        *i64_parts(offset),
        GROUPS=GROUPS_PER_PROGRAM,
        num_warps=NUM_WARPS,
    )


def philox_block(counters: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """Test hook: Philox4x32-10 of each row of an int64 [n, 4] counter tensor (values < 2**32), as int64 [n, 4]."""
    n = counters.shape[0]
    out = torch.empty_like(counters)
    block = triton.next_power_of_2(max(n, 1))
    _philox_test_kernel[(1,)](counters, out, n, k0, k1, BLOCK=block)
    return out


@triton.jit(do_not_specialize=["n", "k0", "k1"])
def _philox_test_kernel(c_ptr, out_ptr, n, k0, k1, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK).to(tl.int64)
    valid = i < n
    c0 = tl.load(c_ptr + 4 * i, mask=valid, other=0).to(tl.uint32)
    c1 = tl.load(c_ptr + 4 * i + 1, mask=valid, other=0).to(tl.uint32)
    c2 = tl.load(c_ptr + 4 * i + 2, mask=valid, other=0).to(tl.uint32)
    c3 = tl.load(c_ptr + 4 * i + 3, mask=valid, other=0).to(tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, k0.to(tl.uint32), k1.to(tl.uint32))
    tl.store(out_ptr + 4 * i, w0.to(tl.int64), mask=valid)
    tl.store(out_ptr + 4 * i + 1, w1.to(tl.int64), mask=valid)
    tl.store(out_ptr + 4 * i + 2, w2.to(tl.int64), mask=valid)
    tl.store(out_ptr + 4 * i + 3, w3.to(tl.int64), mask=valid)
