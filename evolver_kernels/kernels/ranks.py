"""della's drops: each element's drop threshold follows the rank of its magnitude within its row.

Element j of row r is dropped where its Philox word (the random-stream contract's word of global index
offset + r * cols + j on `stream`) is below table[rank], rank the position of |x - base|[r, j] among row r's
magnitudes in ascending order, ties by index (a stable sort's order; NaNs equal and above every number, as
torch.argsort orders them), and `table` non-increasing (della_table). The magnitudes are formed in fp32, as the
fused merge forms a task vector.

The result is a tensor of drop thresholds for the fused merge (`drop_thresholds`), which compares each element's
word with its threshold: the drops are the same on every path, the thresholds need not be. The CPU extension's
kernel (csrc/cpu/select_cpu.cpp) draws the words itself and writes 2**32 (dropped) or 0 (kept), or the drops as
bits (`rank_drop_bits`, which della's rescale reads without drawing the words again and its merge expands): a
bucket of one magnitude ranks its members in index order, another bounds their ranks, which settles almost every
element, and only the few others are ranked exactly, with no sort of the row. Elsewhere (GPUs, an installation
without the extension) torch's stable argsort gives every element its table[rank].
"""

from __future__ import annotations

import torch

from evolver_kernels.kernels.checks import to_int64
from evolver_kernels.kernels.drop_bits import is_packed, pack_drops, packed_size
from evolver_kernels.kernels.histogram import native_magnitudes
from evolver_kernels.kernels.rng import random_words


def _whole_rows(name: str, x: torch.Tensor, table: torch.Tensor) -> int:
    """The row length (len(table)), refused in one line unless x is whole rows of it."""
    cols = table.numel()
    if cols == 0 or x.numel() % cols:
        raise ValueError(f"{name}: {x.numel()} elements are not whole rows of {cols}")
    return cols


def rank_drop_thresholds(
    x: torch.Tensor,
    base: torch.Tensor | None,
    table: torch.Tensor,
    *,
    seed: int,
    stream: int,
    offset: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """int64 like x (flat): drop thresholds that drop exactly the elements described in the module. `x` (and
    `base`, of its size and dtype) whole rows of len(table) elements; `out` (int64, x's size) written when given."""
    cols = _whole_rows("rank_drop_thresholds", x, table)
    if out is None:
        out = torch.empty(x.numel(), dtype=torch.int64, device=x.device)
    flat = x.contiguous().view(-1)
    flat_base = None if base is None else base.contiguous().view(-1)
    if native_magnitudes(x, base):
        torch.ops.evolver_kernels.magnitude_rank_drops_(
            flat, flat_base, table.contiguous(), to_int64(seed), to_int64(stream), offset, out
        )
        return out
    magnitude = (flat.float() - flat_base.float() if flat_base is not None else flat.float()).abs()
    order = torch.argsort(magnitude.view(-1, cols), dim=1, stable=True)
    out.view(-1, cols).scatter_(1, order, table.to(out.device).expand_as(order))
    return out


def rank_drop_bits(
    x: torch.Tensor,
    base: torch.Tensor | None,
    table: torch.Tensor,
    *,
    seed: int,
    stream: int,
    offset: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The drops rank_drop_thresholds describes, as bits (kernels/drop_bits.py: uint8 of packed_size(x.numel()),
    on x's device); `out` written when given. The CPU extension's kernel writes them directly."""
    numel = x.numel()
    if out is None:
        out = torch.empty(packed_size(numel), dtype=torch.uint8, device=x.device)
    elif not is_packed(out, numel) or not out.is_contiguous():
        raise ValueError(f"out: {out.numel()} {out.dtype} for {numel} elements, expected {packed_size(numel)} uint8")
    _whole_rows("rank_drop_bits", x, table)
    if native_magnitudes(x, base):
        flat_base = None if base is None else base.contiguous().view(-1)
        torch.ops.evolver_kernels.magnitude_rank_drops_(
            x.contiguous().view(-1), flat_base, table.contiguous(), to_int64(seed), to_int64(stream), offset, out
        )
        return out
    thresholds = rank_drop_thresholds(x, base, table, seed=seed, stream=stream, offset=offset)
    words = random_words(numel, seed=seed, stream=stream, offset=offset, device=x.device)
    return pack_drops(words < thresholds, out)
