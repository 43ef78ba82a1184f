"""Helpers every merge method streams with: weight checks, chunked reads of the population and of the base
model, and the linear pass (no per-tensor state) through the fused operator merge_tensors."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from evolver_kernels.kernels.checks import MAX_MERGE_INPUTS
from evolver_kernels.kernels.ops import merge_tensors
from evolver_kernels.kernels.rng import STREAM_DARE
from evolver_kernels.storage.arena import Arena, Entry, iter_chunks
from evolver_kernels.storage.population import Population

# a base model: an arena, or a one-model reader of its own files (population.MappedModels, the merge CLI's)
Base = Arena | Population


def check_weights(weights: list[float] | None, n: int) -> list[float]:
    """One non-negative weight per model with a positive sum (default: 1 each)."""
    if n > MAX_MERGE_INPUTS:
        raise ValueError(f"a merge takes at most {MAX_MERGE_INPUTS} models, got {n}")
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"weights: {len(weights)} given for {n} models")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    return [float(w) for w in weights]


def check_base(pop: Population, base: Base | None, method: str) -> Base:
    if base is None:
        raise ValueError(f"{method} needs a base model (the common ancestor of the merged models)")
    if base.layout.fingerprint() != pop.layout.fingerprint():
        raise ValueError("base: its parameters differ from the population's")
    return base


def per_model_chunk(chunk: int, n: int) -> int:
    """Elements per chunk of a pass that holds N fp32 task vectors (or N per-element values) at once: chunk / N,
    so that its buffers hold about one chunk's worth whatever N."""
    return max(1, chunk // n)


def prefetched(pop: Population, base: Base | None = None) -> Iterator[Entry]:
    """pop.layout.entries in order, the readers of the models and of the base asked to read each entry's next one
    ahead (Population.prefetch: a hint). The per-tensor methods read a tensor at least twice (a selection or a
    Gram matrix, then the merge) and sample some first: read ahead, the disk reads the next tensor in order
    while this one is merged from the page cache, and a sample finds its pages on the way."""
    entries = pop.layout.entries
    for i, e in enumerate(entries):
        for ahead in entries[i : i + 2] if i == 0 else entries[i + 1 : i + 2]:
            lo, hi = ahead.offset, ahead.offset + ahead.numel
            for k in range(pop.size):
                pop.prefetch(k, ahead.group, lo, hi)
            if base is not None and not isinstance(base, Arena):
                base.prefetch(0, ahead.group, lo, hi)
        yield e


def read_all(pop: Population, group: str, lo: int, hi: int, device: torch.device) -> list[torch.Tensor]:
    """Chunk [lo, hi) of `group` of every individual, on `device`."""
    return [pop.read(k, group, lo, hi).to(device, non_blocking=True) for k in range(pop.size)]


def base_chunk(base: Base, group: str, lo: int, hi: int, device: torch.device) -> torch.Tensor:
    """Elements [lo, hi) of the base model's group: an arena's (they may span its segments if it is placed), or
    individual 0's of a one-model reader (the base's own files, memory-mapped: population.MappedModels)."""
    if not isinstance(base, Arena):
        return base.read(0, group, lo, hi).to(device)
    parts = [
        t[max(lo, s_lo) - s_lo : min(hi, s_hi) - s_lo]
        for s_lo, s_hi, t in base.segments(group)
        if s_lo < hi and lo < s_hi
    ]
    return parts[0].to(device) if len(parts) == 1 else torch.cat([p.to(device) for p in parts])


def merge_linear(
    pop: Population, out: Arena, chunk: int, backend: str | None, *, base: Base | None = None, fisher=None, **kw
) -> Arena:
    """Every group in chunks that may span tensors (the linear modes have no per-tensor state): `pop.chunks`
    may stage the next chunk's reads (a pipeline's candidate view, staging.py); a placed `out` is merged chunk
    by chunk on the device that holds each segment. A layout that is a subset of the tensors (Layout.subset)
    merges the spans its entries cover, and nothing else."""
    for group, (start, size) in pop.layout.groups.items():
        covered = pop.layout.spans(group)
        if covered != [(0, size)]:  # some tensors only (Layout.subset: per-tensor settings)
            if out.is_placed:
                raise ValueError("a merge of some tensors only writes into an arena that is not placed")
            spans = (
                (a + lo, a + hi, out.buffers[group][a + lo : a + hi])
                for a, b in covered
                for lo, hi in iter_chunks(b - a, chunk)
            )
        elif out.is_placed:
            spans = out.chunks(group, chunk)
        else:
            spans = ((lo, hi, out.buffers[group][lo:hi]) for lo, hi in pop.chunks(group, size, chunk))
        for lo, hi, dst in spans:
            b = base_chunk(base, group, lo, hi, dst.device) if base is not None else None
            f = [fisher.read(k, group, lo, hi).to(dst.device) for k in range(pop.size)] if fisher is not None else None
            merge_tensors(
                read_all(pop, group, lo, hi, dst.device),
                base=b,
                fisher=f,
                offset=start + lo,
                out=dst,
                backend=backend,
                stream=STREAM_DARE,
                **kw,
            )
    return out
