"""Streaming helpers of the methods whose coefficients come from angles between models (spherical.py,
model_stock.py): the Gram matrix of the models (every pairwise dot product, per tensor or per row) in one
reduction pass over chunks, then one element-wise pass that writes out = [base +] sum_k c_k v_k with per-tensor
or per-row coefficients c_k, where v_k = x_k - base with a base and x_k without.

Everything these methods need from a tensor (norms, cosines, the Karcher iterations) is a function of that
Gram matrix: their results are linear combinations of the v_k. So one pass reads every chunk of every model
once, an N x N matrix per tensor (per row) is all that is kept, and memory is O(chunk), never O(N x tensor).

A tensor's "vectors" (`along`): None, the whole tensor flattened; -1, its rows (vectors along the last
dimension, W[i, :]); 0, its columns (vectors along the first dimension, W[:, j]). A tensor of fewer than two
dimensions is one vector whatever `along` says (as torch's dim=-1 / dim=0 reductions treat it). With rows or
columns the tensor is read as an R x C matrix (rows: C = the last dimension; columns: R = the first) in spans
of whole matrix rows, or pieces of one matrix row where a row is longer than the chunk, so that every sum is a
plain reduction over a fixed shape: deterministic on every device, with no scatter and no index tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from evolver_kernels.kernels.gram import add_task_vector_gram
from evolver_kernels.kernels.ops import merge_tensors
from evolver_kernels.methods.streaming import Base, base_chunk, per_model_chunk
from evolver_kernels.storage.arena import Arena, Entry, iter_chunks
from evolver_kernels.storage.population import Population


@dataclasses.dataclass(frozen=True)
class Span:
    """Elements [lo, hi) of a flattened tensor: matrix rows r0 .. r0 + rows - 1 whole (rows > 0), or
    columns c0 .. c0 + hi - lo - 1 of matrix row r0 (rows == 0)."""

    lo: int
    hi: int
    r0: int
    c0: int
    rows: int


def matrix_of(e: Entry, along: int | None) -> tuple[int, int] | None:
    """(R, C): entry `e` as the matrix whose rows (along -1) or columns (along 0) are its vectors; None for one
    vector (the whole tensor)."""
    if along is None or len(e.shape) < 2:
        return None
    if along == -1:
        return e.numel // e.shape[-1], e.shape[-1]
    if along == 0:
        return e.shape[0], e.numel // e.shape[0]
    raise ValueError(f"along must be None, -1 or 0, got {along}")


def vector_count(e: Entry, along: int | None) -> int:
    """How many vectors entry `e` holds."""
    matrix = matrix_of(e, along)
    return 1 if matrix is None else matrix[0] if along == -1 else matrix[1]


def spans(e: Entry, along: int | None, chunk: int) -> Iterator[Span]:
    """The spans a pass over entry `e` takes, each at most `chunk` elements (at least one matrix row when a
    row fits in a chunk)."""
    matrix = matrix_of(e, along)
    if matrix is None:
        for lo, hi in iter_chunks(e.numel, chunk):
            yield Span(lo, hi, 0, 0, 0)
        return
    rows, cols = matrix
    if cols <= chunk:
        per = chunk // cols
        for r0 in range(0, rows, per):
            n = min(per, rows - r0)
            yield Span(r0 * cols, (r0 + n) * cols, r0, 0, n)
    else:
        for r in range(rows):
            for c0, c1 in iter_chunks(cols, chunk):
                yield Span(r * cols + c0, r * cols + c1, r, c0, 0)


def shaped(values: torch.Tensor, e: Entry, along: int | None, span: Span) -> torch.Tensor:
    """A span's elements as [rows, C] for whole matrix rows, else flat."""
    return values.view(span.rows, -1) if span.rows and matrix_of(e, along) is not None else values


def per_element(c: torch.Tensor, e: Entry, along: int | None, span: Span) -> torch.Tensor:
    """Per-vector values `c` [vectors] broadcastable against shaped(span elements)."""
    if matrix_of(e, along) is None:
        return c[0]
    if along == -1:
        return c[span.r0 : span.r0 + span.rows, None] if span.rows else c[span.r0]
    return c[None, :] if span.rows else c[span.c0 : span.c0 + span.hi - span.lo]


def _accumulate(g: torch.Tensor, prod: torch.Tensor, e: Entry, along: int | None, span: Span) -> None:
    """g[vectors] += the per-vector sums of `prod` over the span, in fp64."""
    f64 = torch.float64
    if matrix_of(e, along) is None:
        g[0] += prod.sum(dtype=f64)
    elif along == -1:
        if span.rows:
            g[span.r0 : span.r0 + span.rows] += prod.view(span.rows, -1).sum(1, dtype=f64)
        else:
            g[span.r0] += prod.sum(dtype=f64)
    elif span.rows:
        g += prod.view(span.rows, -1).sum(0, dtype=f64)
    else:
        g[span.c0 : span.c0 + span.hi - span.lo] += prod.to(f64)


def read_span(
    pop: Population, base: Base | None, e: Entry, span: Span, device: torch.device
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Elements [lo, hi) of entry `e` of every model (as stored) and of the base (None without one)."""
    a, b = e.offset + span.lo, e.offset + span.hi
    xs = [pop.read(k, e.group, a, b).to(device) for k in range(pop.size)]
    return xs, base_chunk(base, e.group, a, b, device) if base is not None else None


def gram(
    pop: Population, base: Base | None, e: Entry, along: int | None, chunk: int, device: torch.device
) -> torch.Tensor:
    """G[f, i, j] = <v_i, v_j> over vector f of entry `e`, shape [vectors, N, N], float64. Products are formed
    in fp32 (as mergekit forms them from fp32 inputs), summed in fp64, on spans of chunk / N elements; one vector
    (the whole tensor) by kernels/gram.py, rows or columns by torch."""
    n = pop.size
    if matrix_of(e, along) is None:  # one vector: the Gram kernel, no product tensors
        whole = torch.zeros(n, n, dtype=torch.float64, device=device)
        for span in spans(e, None, per_model_chunk(chunk, n)):
            add_task_vector_gram(whole, *read_span(pop, base, e, span, device))
        return whole[None]
    g = torch.zeros(n, n, vector_count(e, along), dtype=torch.float64, device=device)
    for span in spans(e, along, per_model_chunk(chunk, n)):  # N fp32 vectors per span
        xs, b = read_span(pop, base, e, span, device)
        vs = [x.float() - b.float() if b is not None else x.float() for x in xs]
        for i in range(n):
            for j in range(i, n):
                _accumulate(g[i, j], vs[i] * vs[j], e, along, span)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), 1)[:, :, None]
    return torch.where(upper, g, g.transpose(0, 1)).permute(2, 0, 1)


def combine(
    pop: Population,
    base: Base | None,
    out: Arena,
    e: Entry,
    along: int | None,
    coefficients: torch.Tensor,
    chunk: int,
    backend: str | None,
) -> None:
    """Writes entry `e` of `out`: [base +] sum_k c[f, k] v_k on each vector f, for coefficients shaped
    [vectors, N]. One vector: the fused operator with per-tensor scalar weights; several: fp32 torch on spans
    of whole rows (or pieces of one row), each vector taking its own coefficients."""
    dst = out.view(e).view(-1)  # on the device that holds the entry
    start = pop.layout.groups[e.group][0]
    if matrix_of(e, along) is None:
        weights = [float(c) for c in coefficients[0].tolist()]
        for span in spans(e, None, chunk):
            xs, b = read_span(pop, base, e, span, dst.device)
            merge_tensors(
                xs,
                base=b,
                weights=weights,
                normalize=False,
                offset=start + e.offset + span.lo,
                out=dst[span.lo : span.hi],
                backend=backend,
            )
        return
    per_model = [coefficients[:, k].to(device=dst.device, dtype=torch.float32) for k in range(pop.size)]
    for span in spans(e, along, chunk):
        xs, b = read_span(pop, base, e, span, dst.device)
        bf = shaped(b.float(), e, along, span) if b is not None else None
        y = None
        for k, x in enumerate(xs):
            v = shaped(x.float(), e, along, span)
            term = per_element(per_model[k], e, along, span) * (v - bf if bf is not None else v)
            y = term if y is None else y + term
        # as the fused operator: base + sum, one rounding to the arena's dtype
        dst[span.lo : span.hi] = (bf + y if bf is not None else y).reshape(-1)
