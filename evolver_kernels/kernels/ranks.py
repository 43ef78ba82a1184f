"""della's drops: each element's drop threshold follows the rank of its magnitude within its row.

Element j of row r is dropped where its Philox word (the random-stream contract's word of global index
offset + r * cols + j on `stream`) is below table[rank], rank the position of |x - base|[r, j] among row r's
magnitudes in ascending order, ties by index (a stable sort's order; NaNs equal and above every number, as
torch.argsort orders them), and `table` non-increasing (della_table). The magnitudes are formed in fp32, as the
fused merge forms a task vector.

The result is a tensor of drop thresholds for the fused merge (`drop_thresholds`), which compares each element's
word with its threshold: the drops are the same on every path, the thresholds need not be. The CPU extension's
kernel (csrc/cpu/select_cpu.cpp) draws the words itself and writes 2**32 (dropped) or 0 (kept): a bucket of the
magnitude's bits bounds its rank, which settles almost every element, and only the few others are ranked
exactly, with no sort of the row. Elsewhere (GPUs, an installation without the extension) torch's stable argsort
gives every element its table[rank].
"""

from __future__ import annotations

import torch

from evolver_kernels.kernels.checks import to_int64
from evolver_kernels.kernels.histogram import native_magnitudes


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
    cols = table.numel()
    if cols == 0 or x.numel() % cols:
        raise ValueError(f"rank_drop_thresholds: {x.numel()} elements are not whole rows of {cols}")
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
