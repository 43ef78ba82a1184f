"""Triton kernels of the fused merge (merge: every mode of evolver_kernels.kernels.reference.merge_reference) and of
nearswap. Arguments are checked by evolver_kernels.kernels.ops.merge_tensors."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evolver_kernels.kernels.merge_params import MergeParams
from evolver_kernels.kernels.reference import NEARSWAP_DIFF_MIN
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
    split_seed,
    words_block,
)

# ----------------------------------------------------------------------------------------------------------------
# Fused merge (evolver_kernels.kernels.reference.merge_reference). The models' tensors arrive as a table of int64
# addresses (any number of models in one launch, no stacking); each is cast back to a typed pointer, as in
# Triton's grouped GEMM tutorial.

_MERGE_RUNTIME_INTS = [
    "n_inputs",
    "numel_hi",
    "numel_lo",
    "bound",
    "k0",
    "k1",
    "stream_hi",
    "stream_lo",
    "offset_hi",
    "offset_lo",
]


@triton.jit
def _block_index(pid, offset, GROUPS: tl.constexpr):
    """Global indices [GROUPS, 4] of this program's block (the layout of words_block)."""
    q = (offset >> 2) + pid * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    return q[:, None] * 4 + tl.arange(0, 4)[None, :].to(tl.int64)


@triton.jit
def _load_model(table_ptr, k, p, valid, DTYPE: tl.constexpr):
    address = tl.load(table_ptr + k)
    if DTYPE == 0:
        bits = tl.load(address.to(tl.pointer_type(tl.int32)) + p, mask=valid, other=0)
    else:
        bits = tl.load(address.to(tl.pointer_type(tl.int16)) + p, mask=valid, other=0)
    return bits_to_f32(bits, DTYPE)


@triton.jit
def _merge_task(
    x_table,
    trim_ptr,
    top_ptr,
    d_table,
    dr_ptr,
    k,
    p,
    valid,
    b,
    pid,
    offset,
    rescale,
    bound,
    k0,
    k1,
    stream,
    HAS_BASE: tl.constexpr,
    DROP: tl.constexpr,
    TABLE_DROP: tl.constexpr,
    BAND: tl.constexpr,
    HAS_TOP: tl.constexpr,
    DTYPE: tl.constexpr,
    GROUPS: tl.constexpr,
):
    """Model k's task vector on this block: x - base, DARE's (or della's per-element) drop and rescale, the
    magnitude band."""
    v = _load_model(x_table, k, p, valid, DTYPE)
    if HAS_BASE:
        v = v - b
    if DROP:
        stream_k = stream + k
        _, word = words_block(pid, offset, k0, k1, stream_k & 0xFFFFFFFF, stream_k >> 32, GROUPS)
        v = tl.where(word < bound.to(tl.uint32), 0.0, v * rescale)
    if TABLE_DROP:
        address = tl.load(d_table + k)
        stream_k = stream + k
        _, word = words_block(pid, offset, k0, k1, stream_k & 0xFFFFFFFF, stream_k >> 32, GROUPS)
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
    x_table,
    f_table,
    w_ptr,
    trim_ptr,
    top_ptr,
    e_ptr,
    d_table,
    dr_ptr,
    base_ptr,
    out_ptr,
    n_inputs,
    numel_hi,
    numel_lo,
    scale,
    rescale,
    bound,
    k0,
    k1,
    stream_hi,
    stream_lo,
    offset_hi,
    offset_lo,
    select,
    min_den,
    HAS_BASE: tl.constexpr,
    DROP: tl.constexpr,
    TABLE_DROP: tl.constexpr,
    BAND: tl.constexpr,
    HAS_TOP: tl.constexpr,
    TIES: tl.constexpr,
    SELECT: tl.constexpr,
    FISHER: tl.constexpr,
    NORMALIZE: tl.constexpr,
    DTYPE: tl.constexpr,
    GROUPS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offset = join_i64(offset_hi, offset_lo)
    stream = join_i64(stream_hi, stream_lo)
    p = _block_index(pid, offset, GROUPS) - offset
    valid = (p >= 0) & (p < join_i64(numel_hi, numel_lo))
    b = tl.zeros([GROUPS, 4], dtype=tl.float32)
    if HAS_BASE:
        b = bits_to_f32(tl.load(base_ptr + p, mask=valid, other=0), DTYPE)
    keep = valid
    # `while`, not `for k in range(n_inputs)`: Triton 3.6's interpreter cannot take a runtime argument as a
    # range bound (it converts a 1-element array with int()). Compiled for sm_90, the two forms gave PTX of the
    # same size with the same loads (neither is software-pipelined).
    if SELECT:  # sce: the population variance over the models, as reference.variance_reference computes it
        count = n_inputs.to(tl.float32)
        mean = tl.zeros([GROUPS, 4], dtype=tl.float32)
        k = 0
        while k < n_inputs:
            mean = mean + _merge_task(
                x_table,
                trim_ptr,
                top_ptr,
                d_table,
                dr_ptr,
                k,
                p,
                valid,
                b,
                pid,
                offset,
                rescale,
                bound,
                k0,
                k1,
                stream,
                HAS_BASE,
                DROP,
                TABLE_DROP,
                BAND,
                HAS_TOP,
                DTYPE,
                GROUPS,
            )
            k += 1
        mean = tl.math.div_rn(mean, count)
        var = tl.zeros([GROUPS, 4], dtype=tl.float32)
        k = 0
        while k < n_inputs:
            t = (
                _merge_task(
                    x_table,
                    trim_ptr,
                    top_ptr,
                    d_table,
                    dr_ptr,
                    k,
                    p,
                    valid,
                    b,
                    pid,
                    offset,
                    rescale,
                    bound,
                    k0,
                    k1,
                    stream,
                    HAS_BASE,
                    DROP,
                    TABLE_DROP,
                    BAND,
                    HAS_TOP,
                    DTYPE,
                    GROUPS,
                )
                - mean
            )
            var = var + t * t
            k += 1
        keep = tl.math.div_rn(var, count) >= select
    acc = tl.zeros([GROUPS, 4], dtype=tl.float32)
    den = tl.zeros([GROUPS, 4], dtype=tl.float32)
    k = 0
    while k < n_inputs:
        v = _merge_task(
            x_table,
            trim_ptr,
            top_ptr,
            d_table,
            dr_ptr,
            k,
            p,
            valid,
            b,
            pid,
            offset,
            rescale,
            bound,
            k0,
            k1,
            stream,
            HAS_BASE,
            DROP,
            TABLE_DROP,
            BAND,
            HAS_TOP,
            DTYPE,
            GROUPS,
        )
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
            v = _merge_task(
                x_table,
                trim_ptr,
                top_ptr,
                d_table,
                dr_ptr,
                k,
                p,
                valid,
                b,
                pid,
                offset,
                rescale,
                bound,
                k0,
                k1,
                stream,
                HAS_BASE,
                DROP,
                TABLE_DROP,
                BAND,
                HAS_TOP,
                DTYPE,
                GROUPS,
            )
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
    tl.store(out_ptr + p, f32_to_bits(r, DTYPE), mask=valid)


def merge(p: MergeParams, out: torch.Tensor) -> None:
    """Writes the merge p describes into `out` (arguments checked by MergeParams)."""
    xs, base, fisher, weights, trim, top = p.xs, p.base, p.fisher, p.weights, p.trim, p.top
    elect_weights, select, drop_thresholds, drop_rescales = (
        p.election_weights,
        p.select,
        p.drop_thresholds,
        p.drop_rescales,
    )
    scale, normalize, min_den, rescale, drop_threshold = (
        p.scale,
        bool(p.normalize),
        p.min_den,
        p.rescale,
        p.drop_threshold,
    )
    seed, stream, offset = p.seed, p.stream, p.offset
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
    d_table = torch.tensor(
        [0 if d is None else d.data_ptr() for d in drop_thresholds] if drop_thresholds else [0],
        dtype=torch.int64,
        device=device,
    )
    dr = torch.tensor(drop_rescales if drop_thresholds else [1.0], dtype=torch.float32, device=device)
    base_view = (base if base is not None else out).view(bits)
    k0, k1 = split_seed(seed)
    _merge_kernel[grid(n, offset)](
        x_table,
        f_table,
        w,
        t,
        u,
        e,
        d_table,
        dr,
        base_view,
        out.view(bits),
        len(xs),
        *i64_parts(n),
        scale,
        rescale,
        drop_threshold,
        k0,
        k1,
        *i64_parts(stream),
        *i64_parts(offset),
        0.0 if select is None else select,
        min_den,
        HAS_BASE=base is not None,
        DROP=drop_threshold > 0,
        TABLE_DROP=drop_thresholds is not None,
        BAND=trim is not None or top is not None,
        HAS_TOP=top is not None,
        TIES=elect_weights is not None,
        SELECT=select is not None,
        FISHER=bool(fisher),
        NORMALIZE=normalize,
        DTYPE=DTYPE_CODES[out.dtype],
        GROUPS=GROUPS_PER_PROGRAM,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )


@triton.jit(do_not_specialize=["numel_hi", "numel_lo"])
def _nearswap_kernel(
    x_ptr, base_ptr, out_ptr, numel_hi, numel_lo, t, diff_min, DTYPE: tl.constexpr, BLOCK: tl.constexpr
):
    """mergekit's nearswap of x into the base (reference.nearswap_reference), element-wise."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = i < join_i64(numel_hi, numel_lo)
    x = bits_to_f32(tl.load(x_ptr + i, mask=valid, other=0), DTYPE)
    b = bits_to_f32(tl.load(base_ptr + i, mask=valid, other=0), DTYPE)
    diff = tl.abs(b - x)
    w = tl.math.div_rn(tl.zeros_like(diff) + t, tl.where(diff < diff_min, diff_min, diff))
    w = tl.where(w < 0.0, 0.0, tl.where(w > 1.0, 1.0, w))
    tl.store(out_ptr + i, f32_to_bits(w * x + (1.0 - w) * b, DTYPE), mask=valid)


def nearswap(x: torch.Tensor, base: torch.Tensor, out: torch.Tensor, t: float) -> None:
    """Writes the nearswap of x into base to `out` (arguments checked by evolver_kernels.kernels.ops.merge_tensors)."""
    n = out.numel()
    if n == 0:
        return
    bits = BITS_VIEW[out.dtype]
    block = 4 * GROUPS_PER_PROGRAM
    _nearswap_kernel[(triton.cdiv(n, block),)](
        x.view(bits),
        base.view(bits),
        out.view(bits),
        *i64_parts(n),
        t,
        NEARSWAP_DIFF_MIN,
        DTYPE=DTYPE_CODES[out.dtype],
        BLOCK=block,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
