"""Streaming helpers of the methods whose coefficients come from angles between models (spherical.py,
model_stock.py): the Gram matrix of the models (every pairwise dot product, per tensor or per row) in one
reduction pass over chunks, then one element-wise pass that writes out = [base +] sum_k c_k v_k with per-tensor
or per-row coefficients c_k, where v_k = x_k - base with a base and x_k without.

Everything these methods need from a tensor (norms, cosines, the Karcher iterations) is a function of that
Gram matrix: their results are linear combinations of the v_k. So one pass reads every chunk of every model
once, an N x N matrix per tensor (per row) is all that is kept, and memory is O(chunk), never O(N x tensor).

A tensor's "vectors" (`along`): None, the whole tensor flattened; -1, its rows (vectors along the last
dimension, W[i, :]); 0, its columns (vectors along the first dimension, W[:, j]). A tensor of fewer than two
dimensions is one vector whatever `along` says (as torch's dim=-1 / dim=0 reductions treat it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..arena import Arena, Entry, iter_chunks
from ..ops import merge_tensors
from ..population import Population
from .streaming import base_chunk

FiberIndex = Callable[[int, int, torch.device], torch.Tensor]


def vectors_of(e: Entry, along: int | None) -> tuple[int, FiberIndex | None]:
    """(how many vectors entry `e` holds, index(lo, hi, device) -> the vector of each element [lo, hi) of the
    flattened tensor, or None for one vector)."""
    if along is None or len(e.shape) < 2:
        return 1, None
    if along == -1:
        length = e.shape[-1]
        return e.numel // length, lambda lo, hi, device: torch.arange(lo, hi, device=device) // length
    if along == 0:
        stride = e.numel // e.shape[0]  # elements W[i, ...] and W[i + 1, ...] of one column lie this far apart
        return stride, lambda lo, hi, device: torch.arange(lo, hi, device=device) % stride
    raise ValueError(f"along must be None, -1 or 0, got {along}")


def _read(pop: Population, base: Arena | None, e: Entry, lo: int, hi: int, device: torch.device
          ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Elements [lo, hi) of entry `e` of every model (as stored) and of the base (None without one)."""
    a, b = e.offset + lo, e.offset + hi
    xs = [pop.read(k, e.group, a, b).to(device) for k in range(pop.size)]
    return xs, base_chunk(base, e.group, a, b, device) if base is not None else None


def gram(pop: Population, base: Arena | None, e: Entry, along: int | None, chunk: int,
         device: torch.device) -> torch.Tensor:
    """G[f, i, j] = <v_i, v_j> over vector f of entry `e`, shape [vectors, N, N], float64. Products are formed
    in fp32 (as mergekit forms them from fp32 inputs), summed in fp64 whatever the chunking."""
    n = pop.size
    count, index = vectors_of(e, along)
    g = torch.zeros(count, n, n, dtype=torch.float64, device=device)
    for lo, hi in iter_chunks(e.numel, chunk):
        xs, b = _read(pop, base, e, lo, hi, device)
        vs = [x.float() - b.float() if b is not None else x.float() for x in xs]
        where = index(lo, hi, device) if index is not None else None
        for i in range(n):
            for j in range(i, n):
                prod = vs[i] * vs[j]
                if where is None:
                    g[0, i, j] += prod.sum(dtype=torch.float64)
                else:
                    g[:, i, j].index_add_(0, where, prod.double())
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), 1)
    return torch.where(upper, g, g.transpose(1, 2))


def combine(pop: Population, base: Arena | None, out: Arena, e: Entry, along: int | None,
            coefficients: torch.Tensor, chunk: int, backend: str | None) -> None:
    """Writes entry `e` of `out`: [base +] sum_k c[f, k] v_k on each vector f, for coefficients shaped
    [vectors, N] (vectors_of(e, along)[0] rows). One vector: the fused operator with per-tensor scalar
    weights; several: fp32 torch on the chunk, each element taking its vector's coefficients."""
    dst = out.view(e).view(-1)  # on the device that holds the entry
    start = pop.layout.groups[e.group][0]
    _, index = vectors_of(e, along)
    if index is None:
        weights = [float(c) for c in coefficients[0].tolist()]
    else:
        per_model = [coefficients[:, k].to(device=dst.device, dtype=torch.float32) for k in range(pop.size)]
    for lo, hi in iter_chunks(e.numel, chunk):
        xs, b = _read(pop, base, e, lo, hi, dst.device)
        if index is None:
            merge_tensors(xs, base=b, weights=weights, normalize=False, offset=start + e.offset + lo,
                          out=dst[lo:hi], backend=backend)
            continue
        where = index(lo, hi, dst.device)
        bf = b.float() if b is not None else None
        y = torch.zeros(hi - lo, dtype=torch.float32, device=dst.device)
        for k, x in enumerate(xs):
            y += per_model[k][where] * (x.float() - bf if bf is not None else x.float())
        dst[lo:hi] = bf + y if bf is not None else y  # as the fused operator: base + sum, one rounding to dtype
