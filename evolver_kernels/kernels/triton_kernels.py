"""Triton kernels: Philox4x32-10, the fused DE mutation + crossover and the debug mask.

Import this module only after TRITON_INTERPRET is decided: Triton reads it when kernels are defined.
evolver_kernels.kernels.backends imports it lazily.

Layout: a program owns GROUPS Philox groups aligned to the global index (4 * GROUPS elements), computes
each group's four words once and lays its elements out as a [GROUPS, 4] block, so the random words never
depend on how the caller chunked the tensor. Tensors travel as integer views of their bits: unselected
elements are stored from the loaded bits (bit for bit, NaN payloads included), and bfloat16 is widened
and rounded on bits (the interpreter's bf16 arithmetic is not trustworthy). Launches pass
enable_fp_fusion=False so a + F * d is two roundings, as in the reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from evolver_kernels.kernels.reference import NEARSWAP_DIFF_MIN
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
def _join_i64(hi, lo):
    """hi * 2**31 + lo from two int32-typed pieces (a uint32-typed scalar widens wrongly in the interpreter)."""
    return (hi.to(tl.int64) << 31) | lo.to(tl.int64)


@triton.jit
def _selects(word, bound, take_all):
    """The contract's word < threshold, as a 32-bit compare plus the threshold == 2**32 flag."""
    return (word < bound.to(tl.uint32)) | (take_all != 0)


@triton.jit
def _words_block(pid, offset, k0, k1, s0, s1, GROUPS: tl.constexpr):
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
def _bits_to_f32(bits, DTYPE: tl.constexpr):
    if DTYPE == 0:
        f = bits.to(tl.float32, bitcast=True)
    elif DTYPE == 1:
        f = (bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        f = bits.to(tl.float16, bitcast=True).to(tl.float32)
    return f


@triton.jit
def _f32_to_bits(f, DTYPE: tl.constexpr):
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
    offset = _join_i64(offset_hi, offset_lo)
    j, word = _words_block(pid, offset, k0, k1, s0, s1, GROUPS)
    p = j - offset
    valid = (p >= 0) & (p < _join_i64(numel_hi, numel_lo))
    x_bits = tl.load(x_ptr + p, mask=valid)
    xf = _bits_to_f32(x_bits, DTYPE)
    af = _bits_to_f32(tl.load(a_ptr + p, mask=valid), DTYPE)
    if TWO_INPUTS:
        r = xf + F * (af - xf)
    else:
        basef = _bits_to_f32(tl.load(base_ptr + p, mask=valid), DTYPE)
        bf = _bits_to_f32(tl.load(b_ptr + p, mask=valid), DTYPE)
        r = basef + F * (af - bf)
    selected = _selects(word, bound, take_all)
    tl.store(out_ptr + p, tl.where(selected, _f32_to_bits(r, DTYPE), x_bits), mask=valid)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _mask_kernel(
    out_ptr, numel_hi, numel_lo, bound, take_all, k0, k1, s0, s1, offset_hi, offset_lo, GROUPS: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    offset = _join_i64(offset_hi, offset_lo)
    j, word = _words_block(pid, offset, k0, k1, s0, s1, GROUPS)
    p = j - offset
    selected = _selects(word, bound, take_all)
    tl.store(out_ptr + p, selected.to(tl.uint8), mask=(p >= 0) & (p < _join_i64(numel_hi, numel_lo)))


def _grid(numel: int, offset: int) -> tuple[int]:
    groups = ((offset + numel + 3) >> 2) - (offset >> 2)
    return (triton.cdiv(groups, GROUPS_PER_PROGRAM),)


def _split(v: int) -> tuple[int, int]:
    """(lo, hi) 32-bit words of a 64-bit value: Philox key and stream words."""
    return v & MASK32, v >> 32


def _i64_parts(v: int) -> tuple[int, int]:
    """(hi, lo) with v = hi * 2**31 + lo, both below 2**31, for v < 2**62 (see _join_i64)."""
    return v >> 31, v & 0x7FFFFFFF


def _threshold_args(threshold: int) -> tuple[int, int]:
    """(bound, take_all) for _selects."""
    return (0, 1) if threshold > MASK32 else (threshold, 0)


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
    k0, k1 = _split(seed)
    s0, s1 = _split(stream)
    _de_kernel[_grid(n, offset)](
        x.view(bits),
        a.view(bits),
        base.view(bits),
        b.view(bits),
        out.view(bits),
        *_i64_parts(n),
        F,
        *_threshold_args(threshold),
        k0,
        k1,
        s0,
        s1,
        *_i64_parts(offset),
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
    k0, k1 = _split(seed)
    s0, s1 = _split(stream)
    _mask_kernel[_grid(n, offset)](
        out.view(torch.uint8),
        *_i64_parts(n),
        *_threshold_args(threshold),
        k0,
        k1,
        s0,
        s1,
        *_i64_parts(offset),
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


# ----------------------------------------------------------------------------------------------------------------
# Fused merge (evolver_kernels.kernels.reference.merge_reference). The models' tensors arrive as a table of int64
# addresses (any number of models in one launch, no stacking); each is cast back to a typed pointer, as in
# Triton's grouped GEMM tutorial.

_MERGE_RUNTIME_INTS = ["n_inputs", "numel_hi", "numel_lo", "bound", "k0", "k1", "stream_hi", "stream_lo",
                       "offset_hi", "offset_lo"]


@triton.jit
def _block_index(pid, offset, GROUPS: tl.constexpr):
    """Global indices [GROUPS, 4] of this program's block (the layout of _words_block)."""
    q = (offset >> 2) + pid * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    return q[:, None] * 4 + tl.arange(0, 4)[None, :].to(tl.int64)


@triton.jit
def _load_model(table_ptr, k, p, valid, DTYPE: tl.constexpr):
    address = tl.load(table_ptr + k)
    if DTYPE == 0:
        bits = tl.load(address.to(tl.pointer_type(tl.int32)) + p, mask=valid, other=0)
    else:
        bits = tl.load(address.to(tl.pointer_type(tl.int16)) + p, mask=valid, other=0)
    return _bits_to_f32(bits, DTYPE)


@triton.jit
def _merge_task(x_table, trim_ptr, top_ptr, d_table, dr_ptr, k, p, valid, b, pid, offset, rescale, bound, k0, k1,
                stream, HAS_BASE: tl.constexpr, DROP: tl.constexpr, TABLE_DROP: tl.constexpr, BAND: tl.constexpr,
                HAS_TOP: tl.constexpr, DTYPE: tl.constexpr, GROUPS: tl.constexpr):
    """Model k's task vector on this block: x - base, DARE's (or della's per-element) drop and rescale, the
    magnitude band."""
    v = _load_model(x_table, k, p, valid, DTYPE)
    if HAS_BASE:
        v = v - b
    if DROP:
        stream_k = stream + k
        _, word = _words_block(pid, offset, k0, k1, stream_k & 0xFFFFFFFF, stream_k >> 32, GROUPS)
        v = tl.where(word < bound.to(tl.uint32), 0.0, v * rescale)
    if TABLE_DROP:
        address = tl.load(d_table + k)
        stream_k = stream + k
        _, word = _words_block(pid, offset, k0, k1, stream_k & 0xFFFFFFFF, stream_k >> 32, GROUPS)
        threshold = tl.load(address.to(tl.pointer_type(tl.int64)) + p, mask=valid & (address != 0), other=0)
        dropped = tl.where(word.to(tl.int64) < threshold, 0.0, v * tl.load(dr_ptr + k))
        v = tl.where(address != 0, dropped, v)
    if BAND:
        a = tl.abs(v)
        cut = a < tl.load(trim_ptr + k)
        if HAS_TOP:
            cut = cut | (a >= tl.load(top_ptr + k))
        v = tl.where(cut, 0.0, v)
    return v


@triton.jit(do_not_specialize=_MERGE_RUNTIME_INTS)
def _merge_kernel(
    x_table, f_table, w_ptr, trim_ptr, top_ptr, e_ptr, d_table, dr_ptr, base_ptr, out_ptr, n_inputs, numel_hi,
    numel_lo, scale, rescale, bound, k0, k1, stream_hi, stream_lo, offset_hi, offset_lo, select, min_den,
    HAS_BASE: tl.constexpr, DROP: tl.constexpr, TABLE_DROP: tl.constexpr, BAND: tl.constexpr,
    HAS_TOP: tl.constexpr, TIES: tl.constexpr, SELECT: tl.constexpr, FISHER: tl.constexpr,
    NORMALIZE: tl.constexpr, DTYPE: tl.constexpr, GROUPS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offset = _join_i64(offset_hi, offset_lo)
    stream = _join_i64(stream_hi, stream_lo)
    p = _block_index(pid, offset, GROUPS) - offset
    valid = (p >= 0) & (p < _join_i64(numel_hi, numel_lo))
    b = tl.zeros([GROUPS, 4], dtype=tl.float32)
    if HAS_BASE:
        b = _bits_to_f32(tl.load(base_ptr + p, mask=valid, other=0), DTYPE)
    keep = valid
    # `while`, not `for k in range(n_inputs)`: Triton 3.6's interpreter cannot take a runtime argument as a
    # range bound (it converts a 1-element array with int()). Compiled for sm_90, the two forms gave PTX of the
    # same size with the same loads (neither is software-pipelined).
    if SELECT:  # sce: the population variance over the models, as reference.variance_reference computes it
        count = n_inputs.to(tl.float32)
        mean = tl.zeros([GROUPS, 4], dtype=tl.float32)
        k = 0
        while k < n_inputs:
            mean = mean + _merge_task(x_table, trim_ptr, top_ptr, d_table, dr_ptr, k, p, valid, b, pid, offset,
                                      rescale, bound, k0, k1, stream, HAS_BASE, DROP, TABLE_DROP, BAND, HAS_TOP,
                                      DTYPE, GROUPS)
            k += 1
        mean = tl.math.div_rn(mean, count)
        var = tl.zeros([GROUPS, 4], dtype=tl.float32)
        k = 0
        while k < n_inputs:
            t = _merge_task(x_table, trim_ptr, top_ptr, d_table, dr_ptr, k, p, valid, b, pid, offset, rescale,
                            bound, k0, k1, stream, HAS_BASE, DROP, TABLE_DROP, BAND, HAS_TOP, DTYPE, GROUPS) - mean
            var = var + t * t
            k += 1
        keep = tl.math.div_rn(var, count) >= select
    acc = tl.zeros([GROUPS, 4], dtype=tl.float32)
    den = tl.zeros([GROUPS, 4], dtype=tl.float32)
    k = 0
    while k < n_inputs:
        v = _merge_task(x_table, trim_ptr, top_ptr, d_table, dr_ptr, k, p, valid, b, pid, offset, rescale, bound,
                        k0, k1, stream, HAS_BASE, DROP, TABLE_DROP, BAND, HAS_TOP, DTYPE, GROUPS)
        if SELECT:
            v = tl.where(keep, v, 0.0)
        if TIES:
            acc = acc + tl.load(e_ptr + k) * v  # the election's total
        else:
            c = tl.broadcast_to(tl.load(w_ptr + k), v.shape)
            if FISHER:
                address = tl.load(f_table + k)
                c = c * tl.load(address.to(tl.pointer_type(tl.float32)) + p, mask=valid, other=0.0)
            acc = acc + c * v
            den = den + c
        k += 1
    if TIES:
        total = tl.zeros([GROUPS, 4], dtype=tl.float32)
        k = 0
        while k < n_inputs:
            v = _merge_task(x_table, trim_ptr, top_ptr, d_table, dr_ptr, k, p, valid, b, pid, offset, rescale,
                            bound, k0, k1, stream, HAS_BASE, DROP, TABLE_DROP, BAND, HAS_TOP, DTYPE, GROUPS)
            if SELECT:
                v = tl.where(keep, v, 0.0)
            e = tl.load(e_ptr + k) * v
            w = tl.load(w_ptr + k)
            agree = tl.where(acc >= 0.0, e > 0.0, e < 0.0)
            total = tl.where(agree, total + w * v, total)
            den = tl.where(agree, den + w, den)
            k += 1
        acc = total
    y = acc
    if NORMALIZE:
        if min_den > 0.0:
            y = tl.math.div_rn(y, tl.where(den < min_den, min_den, den))
        else:
            nonzero = den != 0.0
            y = tl.where(nonzero, tl.math.div_rn(y, tl.where(nonzero, den, 1.0)), 0.0)
    if HAS_BASE:
        r = b + scale * y
    else:
        r = scale * y
    tl.store(out_ptr + p, _f32_to_bits(r, DTYPE), mask=valid)


def merge(xs: list[torch.Tensor], base: torch.Tensor | None, fisher: list[torch.Tensor] | None,
          weights: list[float], trim: list[float] | None, top: list[float] | None,
          elect_weights: list[float] | None, select: float | None, out: torch.Tensor, *, scale: float,
          normalize: bool, min_den: float, rescale: float, drop_threshold: int,
          drop_thresholds: list[torch.Tensor | None] | None, drop_rescales: list[float] | None, seed: int,
          stream: int, offset: int) -> None:
    """Writes the merge of xs into `out` (arguments checked by evolver_kernels.kernels.ops.merge_tensors);
    elect_weights None: no election (TIES)."""
    n = out.numel()
    if n == 0:
        return
    device = out.device
    bits = BITS_VIEW[out.dtype]
    x_table = torch.tensor([x.data_ptr() for x in xs], dtype=torch.int64, device=device)
    f_table = torch.tensor([f.data_ptr() for f in fisher] if fisher else [0], dtype=torch.int64, device=device)
    w = torch.tensor(weights, dtype=torch.float32, device=device)
    t = torch.tensor(trim if trim is not None else [0.0] * len(xs), dtype=torch.float32, device=device)
    u = torch.tensor(top if top is not None else [0.0] * len(xs), dtype=torch.float32, device=device)
    e = torch.tensor(elect_weights if elect_weights is not None else weights, dtype=torch.float32, device=device)
    d_table = torch.tensor([0 if d is None else d.data_ptr() for d in drop_thresholds] if drop_thresholds else [0],
                           dtype=torch.int64, device=device)
    dr = torch.tensor(drop_rescales if drop_thresholds else [1.0], dtype=torch.float32, device=device)
    base_view = (base if base is not None else out).view(bits)
    k0, k1 = _split(seed)
    _merge_kernel[_grid(n, offset)](
        x_table, f_table, w, t, u, e, d_table, dr, base_view, out.view(bits), len(xs), *_i64_parts(n), scale,
        rescale, drop_threshold, k0, k1, *_i64_parts(stream), *_i64_parts(offset), 0.0 if select is None else select,
        min_den,
        HAS_BASE=base is not None, DROP=drop_threshold > 0, TABLE_DROP=drop_thresholds is not None,
        BAND=trim is not None or top is not None, HAS_TOP=top is not None, TIES=elect_weights is not None,
        SELECT=select is not None, FISHER=bool(fisher),
        NORMALIZE=normalize, DTYPE=DTYPE_CODES[out.dtype], GROUPS=GROUPS_PER_PROGRAM, num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )


@triton.jit(do_not_specialize=["numel_hi", "numel_lo"])
def _nearswap_kernel(x_ptr, base_ptr, out_ptr, numel_hi, numel_lo, t, diff_min, DTYPE: tl.constexpr,
                     BLOCK: tl.constexpr):
    """mergekit's nearswap of x into the base (reference.nearswap_reference), element-wise."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = i < _join_i64(numel_hi, numel_lo)
    x = _bits_to_f32(tl.load(x_ptr + i, mask=valid, other=0), DTYPE)
    b = _bits_to_f32(tl.load(base_ptr + i, mask=valid, other=0), DTYPE)
    diff = tl.abs(b - x)
    w = tl.math.div_rn(tl.zeros_like(diff) + t, tl.where(diff < diff_min, diff_min, diff))
    w = tl.where(w < 0.0, 0.0, tl.where(w > 1.0, 1.0, w))
    tl.store(out_ptr + i, _f32_to_bits(w * x + (1.0 - w) * b, DTYPE), mask=valid)


def nearswap(x: torch.Tensor, base: torch.Tensor, out: torch.Tensor, t: float) -> None:
    """Writes the nearswap of x into base to `out` (arguments checked by evolver_kernels.kernels.ops.merge_tensors)."""
    n = out.numel()
    if n == 0:
        return
    bits = BITS_VIEW[out.dtype]
    block = 4 * GROUPS_PER_PROGRAM
    _nearswap_kernel[(triton.cdiv(n, block),)](
        x.view(bits), base.view(bits), out.view(bits), *_i64_parts(n), t, NEARSWAP_DIFF_MIN,
        DTYPE=DTYPE_CODES[out.dtype], BLOCK=block, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
