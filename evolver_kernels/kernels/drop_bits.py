"""Drops decided once, kept as bits: bit j % 8 of byte j // 8 set where element j is dropped (`packed_size` bytes for
n elements). della's rank pass (kernels/ranks.py) writes them and its rescale (kernels/rescale.py) reads them
instead of drawing the words again; `expand_drops` turns them into the thresholds (2**32 or 0) that make the fused
merge drop the same elements.
"""

from __future__ import annotations

import torch

from evolver_kernels.kernels import backends

_BITS = torch.arange(8, dtype=torch.uint8)


def packed_size(numel: int) -> int:
    """Bytes of the drop bits of `numel` elements."""
    return (numel + 7) // 8


def is_packed(t: torch.Tensor, numel: int) -> bool:
    """`t` holds the drop bits of `numel` elements (uint8, packed_size(numel) of them)."""
    return t.dtype == torch.uint8 and t.numel() == packed_size(numel)


def _check_packed(packed: torch.Tensor, numel: int) -> None:
    if not is_packed(packed, numel):
        raise ValueError(f"packed: {packed.numel()} bytes for {numel} elements, expected {packed_size(numel)}")


def pack_drops(dropped: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """packed (uint8 of packed_size(dropped.numel())) = the bits of bool `dropped` (flat); returns packed."""
    flags = torch.zeros(packed.numel() * 8, dtype=torch.uint8, device=dropped.device)
    flags[: dropped.numel()] = dropped.reshape(-1)
    return packed.copy_((flags.view(-1, 8) << _BITS.to(dropped.device)).sum(1, dtype=torch.uint8))


def unpack_drops(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Bool [numel]: which elements `packed` drops (torch)."""
    _check_packed(packed, numel)
    bits = (packed.view(-1, 1) >> _BITS.to(packed.device)) & 1
    return bits.view(-1)[:numel].bool()


def native_bits(packed: torch.Tensor) -> bool:
    """The CPU extension's kernel expands these bits."""
    return packed.device.type == "cpu" and backends.cpu_extension() is not None


def expand_drops(packed: torch.Tensor, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [numel] on packed's device: 2**32 where `packed` records a drop (every word is below it), else 0 (none
    is): the fused merge's drop_thresholds for the same drops. `out` written when given."""
    _check_packed(packed, numel)
    if out is None:
        out = torch.empty(numel, dtype=torch.int64, device=packed.device)
    if native_bits(packed):
        torch.ops.evolver_kernels.expand_drops_(packed.contiguous(), out)
        return out
    return out.copy_(unpack_drops(packed, numel).to(torch.int64) << 32)
