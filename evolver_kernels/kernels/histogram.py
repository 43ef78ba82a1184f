"""Radix histograms of magnitudes: the passes of the exact k-th-largest selections (TIES' and breadcrumbs' trims,
sce's variances) that replace a sort, and the one-pass window count that replaces both passes when a sample has
narrowed the answer (counting what lies above the window, gathering what lies in it).

The magnitudes are |x - base| formed in fp32 (|x| without a base), which is how the fused merge forms a task
vector before trimming it, and are counted by their fp32 bit patterns (non-negative floats order as their bits):
by the top 16 bits, or within chosen buckets of the top 16 bits by the low 16 bits. The counts are integers, so
every implementation gives the same: the CPU extension's kernel (csrc/cpu/select_cpu.cpp: one pass over x and
base at memory speed, both threads, no tensor of magnitudes) where it runs, torch elsewhere (GPUs, an
installation without the extension).
"""

from __future__ import annotations

import torch

from evolver_kernels.kernels import backends

BUCKETS = 1 << 16
_NATIVE = (torch.float32, torch.bfloat16, torch.float16)


def count_into(counts: torch.Tensor, idx: torch.Tensor) -> None:
    """counts[i] += how many of idx equal i (exact integer counts: the same in any order, on any device);
    bincount for large chunks, index_add_ for small ones (bincount's cost is O(len(counts)) per call)."""
    if idx.numel() >= counts.numel():
        counts += torch.bincount(idx, minlength=counts.numel())
    else:
        counts.index_add_(0, idx, torch.ones((), dtype=counts.dtype, device=counts.device).expand(idx.numel()))


def magnitude_bits(x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """The int32 bit patterns of |x - base| in fp32 (of |x| without a base)."""
    v = x.float() - base.float() if base is not None else x.float()
    return v.abs().view(torch.int32)


def native_magnitudes(x: torch.Tensor, base: torch.Tensor | None) -> bool:
    """The CPU extension's magnitude kernels take these chunks (its histograms, gathers and ranks)."""
    return (
        x.device.type == "cpu"
        and x.dtype in _NATIVE
        and (base is None or base.dtype == x.dtype)
        and backends.cpu_extension() is not None
    )


def magnitude_histogram(
    counts: torch.Tensor, x: torch.Tensor, base: torch.Tensor | None = None, slots: torch.Tensor | None = None
) -> None:
    """counts (int64, on x's device) += the histogram of the magnitudes of x (a 1-D chunk; `base` the same
    size and dtype): by their top 16 bits (counts of BUCKETS), or with `slots` (int32 of BUCKETS: the bucket's
    histogram number, -1 where not counted) by their low 16 bits into counts[slot * BUCKETS + low]."""
    if native_magnitudes(x, base):
        torch.ops.evolver_kernels.magnitude_histogram_(
            x.contiguous().view(-1), None if base is None else base.contiguous().view(-1), slots, counts
        )
        return
    bits = magnitude_bits(x, base).view(-1)
    if slots is None:
        count_into(counts, bits >> 16)
        return
    slot = slots[(bits >> 16).long()]
    chosen = slot >= 0
    count_into(counts, slot[chosen].long() * BUCKETS + (bits[chosen] & 0xFFFF).long())


def magnitude_gather(
    counts: torch.Tensor,
    outs: list[torch.Tensor],
    xs: list[torch.Tensor],
    base: torch.Tensor | None,
    windows: list[tuple[int, int, int]],
) -> None:
    """One pass of selections that a sample narrowed, each window (i, lo, hi) a range [lo, hi] of fp32 bit patterns
    of the magnitudes of xs[i] (as magnitude_histogram forms them; xs 1-D chunks of one size and dtype, `base` the
    same or None): counts[w, 0] += how many lie above hi; those in the window are appended to outs[w] (int32 bits)
    at counts[w, 1] while it has room, and counts[w, 1] += how many (int64 counts of 2 per window, on the device of
    xs; which of them fill the room is unspecified, their multiset is not when they all fit). The CPU kernel reads
    every x and the base once, whatever the windows."""
    if all(native_magnitudes(x, base) for x in xs):
        torch.ops.evolver_kernels.magnitude_gather_(
            [x.contiguous().view(-1) for x in xs],
            None if base is None else base.contiguous().view(-1),
            [i for i, _, _ in windows],
            [lo for _, lo, _ in windows],
            [hi for _, _, hi in windows],
            outs,
            counts,
        )
        return
    bits = {i: magnitude_bits(xs[i], base).view(-1) for i in {i for i, _, _ in windows}}
    for (i, lo, hi), out, c in zip(windows, outs, counts.view(-1, 2)):
        inside = bits[i][(bits[i] >= lo) & (bits[i] <= hi)]
        at = int(c[1])
        room = max(0, min(out.numel() - at, inside.numel()))
        out[at : at + room] = inside[:room]
        c[0] += (bits[i] > hi).sum()
        c[1] += inside.numel()
