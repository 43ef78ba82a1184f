"""Streaming merge methods over a population's arenas: never a stack of N tensors, never a full-size
temporary; chunk buffers only. Sums run in fp32 in slot order with one rounding to the arena's dtype.

  average            out = sum_k w_k x_k / sum_k w_k        (simple average: w_k = 1; model soup)
  task_arithmetic    out = base + scale * sum_k (x_k - base)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .arena import Arena, iter_chunks
from .population import Population


def _check_weights(weights: list[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"weights: {len(weights)} given for {n} models")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    return [float(w) for w in weights]


def mean_into(dst: torch.Tensor, parts: Iterable[torch.Tensor], weights: list[float], acc: torch.Tensor) -> torch.Tensor:
    """dst = sum_k weights[k] * parts[k] / sum(weights): fp32 accumulation in `acc` (a chunk buffer), parts
    consumed one at a time in order (a generator may produce each just in time), one rounding to dst."""
    acc.zero_()
    for part, w in zip(parts, weights):
        if w:
            acc.add_(part, alpha=w)
    return dst.copy_(acc.div_(sum(weights)))


def average(pop: Population, out: Arena, weights: list[float] | None = None, chunk: int = 1 << 22) -> Arena:
    """out = the weighted average of the population (uniform by default)."""
    w = _check_weights(weights, pop.size)
    for group, (_, size) in pop.layout.groups.items():
        dst = out.buffers[group]
        acc = torch.empty(min(chunk, size), dtype=torch.float32, device=dst.device)
        for lo, hi in iter_chunks(size, chunk):
            parts = (pop.read(k, group, lo, hi).to(dst.device) for k in range(pop.size))
            mean_into(dst[lo:hi], parts, w, acc[: hi - lo])
    return out


def task_arithmetic(pop: Population, base: Arena, out: Arena, scale: float, chunk: int = 1 << 22) -> Arena:
    """out = base + scale * sum_k (x_k - base) (Ilharco et al., task vectors)."""
    if base.layout.fingerprint() != pop.layout.fingerprint():
        raise ValueError("base: its parameters differ from the population's")
    for group, (_, size) in pop.layout.groups.items():
        for lo, hi in iter_chunks(size, chunk):
            b = base.buffers[group][lo:hi].float()
            acc = torch.zeros_like(b)
            for k in range(pop.size):
                acc.add_(pop.read(k, group, lo, hi).to(b.device).float() - b)
            out.buffers[group][lo:hi].copy_(b.add_(acc, alpha=scale))
    return out
