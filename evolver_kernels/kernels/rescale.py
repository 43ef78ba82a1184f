"""della's L1 rescale (mergekit's `rescale`): the L1 norm of a task vector before its drops and of what survives
them, from which each model's survivors are scaled back to the tensor's norm.

Element j (global index offset + j) of x - base is dropped where its Philox word on `stream` is below its drop
threshold, as the fused merge's `drop_thresholds` drop it, or where the drops decided already (kernels/drop_bits.py,
from della's rank pass) say so; the magnitudes are fp32, as the merge forms a task vector, and the sums fp64. The
CPU extension's kernel (csrc/cpu/rescale_cpu.cpp) reads x and base once and forms neither the task vector nor the
survivors; elsewhere (GPUs, an installation without the extension) torch forms both. The sums agree to fp64
rounding (the order of the additions differs), far below the float32 the factor is used in.

The same pass can record the drops it decided as bits (`packed`), which expand into thresholds the fused merge
drops the same elements with (kernels/drop_bits.py): della decides each drop once, not in its rescale pass and
again in its merge pass.
"""

from __future__ import annotations

import torch

from evolver_kernels.kernels.checks import to_int64
from evolver_kernels.kernels.drop_bits import is_packed, pack_drops, unpack_drops
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
    dtype, or None; `thresholds` int64 of x's size, or one element for all of them, or the drops decided already
    (drop_bits: uint8 of packed_size(x.numel())). `packed` (uint8 of packed_size(x.numel()), zeroed, on x's
    device): bit j % 8 of byte j // 8 set where element j is dropped."""
    flat = x.contiguous().view(-1)
    flat_base = None if base is None else base.contiguous().view(-1)
    decided = thresholds.dtype == torch.uint8
    if not (
        is_packed(thresholds, flat.numel())
        if decided
        else thresholds.dtype == torch.int64 and thresholds.numel() in (1, flat.numel())
    ):
        raise ValueError(
            f"thresholds: {thresholds.numel()} {thresholds.dtype} given for {flat.numel()} elements (int64: one, or "
            f"one each; uint8: the drops as bits)"
        )
    if native_magnitudes(flat, flat_base):
        torch.ops.evolver_kernels.dropped_l1_(
            flat, flat_base, thresholds.contiguous(), to_int64(seed), to_int64(stream), offset, sums, packed
        )
        return
    magnitude = (flat.float() - flat_base.float() if flat_base is not None else flat.float()).abs()
    if decided:
        dropped = unpack_drops(thresholds.to(flat.device), flat.numel())
    else:
        words = random_words(flat.numel(), seed=seed, stream=stream, offset=offset, device=flat.device)
        dropped = words < thresholds.to(flat.device).view(-1)
    kept = torch.where(dropped, torch.zeros((), device=flat.device), magnitude)
    sums += torch.stack([magnitude.sum(dtype=torch.float64), kept.sum(dtype=torch.float64)])
    if packed is not None:
        pack_drops(dropped, packed)
