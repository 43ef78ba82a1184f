"""della's L1 rescale (mergekit's `rescale`): the L1 norm of a task vector before its drops and of what survives
them, from which each model's survivors are scaled back to the tensor's norm.

Element j (global index offset + j) of x - base is dropped where its Philox word on `stream` is below its drop
threshold, as the fused merge's `drop_thresholds` drop it; the magnitudes are fp32, as the merge forms a task
vector, and the sums fp64. The CPU extension's kernel (csrc/cpu/rescale_cpu.cpp) reads x and base once and forms
neither the task vector nor the survivors; elsewhere (GPUs, an installation without the extension) torch forms
both. The sums agree to fp64 rounding (the order of the additions differs), far below the float32 the factor is
used in.

The same pass can record the drops as bits (1 bit per element; `packed_size`), which `expand_drops` turns back
into thresholds the fused merge drops the same elements with: della decides each drop once, not in its rescale
pass and again in its merge pass.
"""

from __future__ import annotations

import torch

from evolver_kernels.kernels import backends
from evolver_kernels.kernels.checks import to_int64
from evolver_kernels.kernels.histogram import native_magnitudes
from evolver_kernels.kernels.rng import random_words


def add_dropped_l1(
    sums: torch.Tensor,
    x: torch.Tensor,
    base: torch.Tensor | None,
    thresholds: torch.Tensor,
    *,
    seed: int,
    stream: int,
    offset: int,
    packed: torch.Tensor | None = None,
) -> None:
    """sums (float64 [2], on x's device) += (sum |x - base|, the same over the kept elements). `base` of x's size and
    dtype, or None; `thresholds` int64 of x's size, or one element for all of them. `packed` (uint8 of
    packed_size(x.numel()), zeroed, on x's device): bit j % 8 of byte j // 8 set where element j is dropped."""
    flat = x.contiguous().view(-1)
    flat_base = None if base is None else base.contiguous().view(-1)
    if thresholds.numel() not in (1, flat.numel()):
        raise ValueError(f"thresholds: {thresholds.numel()} given for {flat.numel()} elements (one, or one each)")
    if native_magnitudes(flat, flat_base):
        torch.ops.evolver_kernels.dropped_l1_(
            flat, flat_base, thresholds.contiguous(), to_int64(seed), to_int64(stream), offset, sums, packed
        )
        return
    magnitude = (flat.float() - flat_base.float() if flat_base is not None else flat.float()).abs()
    words = random_words(flat.numel(), seed=seed, stream=stream, offset=offset, device=flat.device)
    dropped = words < thresholds.to(flat.device).view(-1)
    kept = torch.where(dropped, torch.zeros((), device=flat.device), magnitude)
    sums += torch.stack([magnitude.sum(dtype=torch.float64), kept.sum(dtype=torch.float64)])
    if packed is not None:
        flags = torch.zeros(packed.numel() * 8, dtype=torch.uint8, device=flat.device)
        flags[: flat.numel()] = dropped
        packed.copy_((flags.view(-1, 8) << _BITS.to(flat.device)).sum(1, dtype=torch.uint8))


_BITS = torch.arange(8, dtype=torch.uint8)


def native_bits(packed: torch.Tensor) -> bool:
    """The CPU extension's kernel expands these bits."""
    return packed.device.type == "cpu" and backends.cpu_extension() is not None


def packed_size(numel: int) -> int:
    """Bytes of the drop bits of `numel` elements."""
    return (numel + 7) // 8


def expand_drops(packed: torch.Tensor, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [numel] on packed's device: 2**32 where add_dropped_l1 recorded a drop (every word is below it), else
    0 (none is): the fused merge's drop_thresholds for the same drops. `out` written when given."""
    if packed.numel() != packed_size(numel):
        raise ValueError(f"packed: {packed.numel()} bytes for {numel} elements, expected {packed_size(numel)}")
    if out is None:
        out = torch.empty(numel, dtype=torch.int64, device=packed.device)
    if native_bits(packed):
        torch.ops.evolver_kernels.expand_drops_(packed.contiguous(), out)
        return out
    bits = (packed.view(-1, 1) >> _BITS.to(packed.device)) & 1
    out.copy_(bits.view(-1)[:numel].to(torch.int64) << 32)
    return out
