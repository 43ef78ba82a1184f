"""TIES' trims found in the merge's own pass: the CPU extension's ties_window_merge_ op (csrc/cpu/merge_cpu.h
MergeWindows). A sample has placed each model's trim (the k-th largest |x_k - base|) in a window [lo, hi] of fp32
bit patterns (methods/selection.sample_windows); the fused TIES merge then trims each model below its lo (an
element above hi is kept and one below lo dropped whatever the trim in the window) while it counts what lies above
each window, gathers what lies in it (as kernels/histogram.magnitude_gather does) and records every element that
lies in some model's window: its index and its inputs, to be merged again once the trims are known. The models and
the base are read once where the two passes (select, then merge) read them twice. CPU only; elsewhere the two
passes run (methods/task_vectors.ties).
"""

from __future__ import annotations

import torch

from evolver_kernels.kernels import backends
from evolver_kernels.kernels.histogram import native_magnitudes


def available(xs: list[torch.Tensor], base: torch.Tensor, out: torch.Tensor, backend: str | None) -> bool:
    """The op takes these chunks: host tensors of one native dtype, the CPU extension loaded, and the merge's
    backend the CPU extension's (another backend asked for runs the two passes with it)."""
    return (
        out.device.type == "cpu"
        and all(native_magnitudes(x, base) and x.dtype == out.dtype for x in xs)
        and backends.resolve_backend(backend, out.device) == "cpu"
        and hasattr(torch.ops.evolver_kernels, "ties_window_merge_")
    )


def ties_window_merge(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weights: list[float],
    scale: float,
    normalize: bool,
    windows: list[tuple[int, int]],
    index_base: int,
    gathered: list[torch.Tensor],
    counts: torch.Tensor,
    fix_index: torch.Tensor,
    fix_values: torch.Tensor,
    fix_count: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out = TIES of the chunks xs over base (1-D, one dtype, contiguous; the signs elected with `weights`) with
    model k trimmed below windows[k][0] (fp32 bits), exact wherever no model's magnitude lies in its window
    [lo, hi]. counts[k] (int64 [n, 2]) += (how many of model k's magnitudes lie above hi, how many in the window),
    those in it appended to gathered[k] (int32 bits) while it has room. Each element in some window is recorded at
    fix_count (int64 [1]) while fix_index has room: its index (index_base + its place in the chunk) into fix_index,
    its x_k into fix_values[k] and its base into fix_values[n] (fix_values: [n + 1, len(fix_index)] of the dtype);
    fix_count += how many. Which records fill the room, and in what order, is unspecified; their set is not."""
    torch.ops.evolver_kernels.ties_window_merge_(
        xs,
        base,
        [float(w) for w in weights],
        [float(w) for w in weights],
        float(scale),
        bool(normalize),
        [lo for lo, _ in windows],
        [hi for _, hi in windows],
        int(index_base),
        gathered,
        counts,
        fix_index,
        fix_values,
        fix_count,
        out,
    )
