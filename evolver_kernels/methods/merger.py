"""Merging a population with a registered method (evolver_kernels/methods/: one record per method, its
parameters and its streaming implementation). `Merger` binds a method to its settings, base model, weights,
seed and statistics once; `merger(pop, out)` merges any Population-like reader (the driver passes a view of
the population with offspring in some slots) into an arena. Every method streams chunk by chunk, most through
the fused operator evolver_kernels.merge_tensors: each chunk of every model is read once and the merged chunk
written once; never a stack of N tensors, never a mask tensor (docs/ARCHITECTURE.md §5); the methods whose
coefficients come from angles (slerp, nuslerp, multislerp, karcher, model_stock) first reduce each tensor to the
models' Gram matrix in one streamed pass (methods/geometry.py); breadcrumbs, della and sce (methods/sparsify.py, methods/della.py)
reduce each tensor to thresholds or norms first, then merge element-wise through the fused operator, as nearswap
does (methods/nearswap.py); ram and ramplus_tl (methods/ram.py, after ramplus_tl's per-tensor counts) and
arcee_fusion (methods/arcee_fusion.py, after its per-tensor quantiles) merge element-wise in plain fp32 torch on
chunks: not fused kernels. Exact arithmetic:
evolver_kernels.kernels.reference.merge_reference. Where ours differs from mergekit: the docstrings of
methods/task_vectors.py, methods/spherical.py, methods/model_stock.py, methods/sparsify.py, methods/nearswap.py,
methods/ram.py and methods/arcee_fusion.py.

The function forms average, task_arithmetic, ties, kth_largest_magnitude, slerp, nuslerp, multislerp, karcher,
model_stock, breadcrumbs, della, sce, nearswap, ram (ram and ramplus_tl) and arcee_fusion are the methods' own
and are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from evolver_kernels import methods
from evolver_kernels.methods.arcee_fusion import arcee_fusion
from evolver_kernels.methods.della import della
from evolver_kernels.methods.linear import average
from evolver_kernels.methods.model_stock import model_stock
from evolver_kernels.methods.nearswap import nearswap
from evolver_kernels.methods.ram import ram
from evolver_kernels.methods.selection import kth_largest_magnitude
from evolver_kernels.methods.sparsify import breadcrumbs, sce
from evolver_kernels.methods.spherical import karcher, multislerp, nuslerp, slerp
from evolver_kernels.methods.streaming import Base
from evolver_kernels.methods.task_vectors import task_arithmetic, ties
from evolver_kernels.storage.arena import Arena, Entry, Layout
from evolver_kernels.storage.population import Population, ReadOnlyView

__all__ = [
    "Merger",
    "TensorGroup",
    "arcee_fusion",
    "average",
    "breadcrumbs",
    "compute_statistics",
    "della",
    "merge_per_tensor",
    "karcher",
    "kth_largest_magnitude",
    "load_statistics",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "ram",
    "sce",
    "slerp",
    "task_arithmetic",
    "ties",
]


class Merger:
    """A registered merge method with its settings, checked once. `params` are the method's parameters (any
    it does not have is refused); `stats` is its Statistics' estimate for methods that have one."""

    def __init__(
        self,
        method: str = "average",
        base: Base | None = None,
        *,
        weights: list[float] | None = None,
        seed: int = 0,
        backend: str | None = None,
        stats: Any = None,
        **params,
    ):
        self.record = methods.get(method)
        self.method = self.record.name
        self.settings = self.record.settings(params)
        self.record.check_use(None, weights, base, stats)  # the models are known when it is called
        self.base, self.weights, self.seed, self.backend, self.stats = base, weights, seed, backend, stats

    def describe(self) -> str:
        return self.record.phrase(self.settings)

    def changed(self, i: int) -> None:
        """Individual i of the population was replaced (cached per-individual terms are stale)."""
        if self.stats is not None:
            self.stats.changed(i)

    def __call__(self, pop: Population, out: Arena, chunk: int = 1 << 22) -> Arena:
        self.record.check_use(pop.size, self.weights, self.base, self.stats)
        ctx = methods.MergeContext(
            settings=self.settings,
            base=self.base,
            weights=self.weights,
            seed=self.seed,
            backend=self.backend,
            chunk=chunk,
            stats=self.stats,
        )
        return self.record.merge(pop, out, ctx)


class _Tensors(ReadOnlyView):
    """A population seen through some of its tensors (Layout.subset)."""

    def __init__(self, pop: Population, layout: Layout):
        self.pop, self.layout, self.size = pop, layout, pop.size

    def read(self, i: int, group: str, lo: int, hi: int):
        return self.pop.read(i, group, lo, hi)


TensorGroup = tuple[list[Entry], dict[str, Any], list[float] | None]  # tensors, their settings, their weights


def merge_per_tensor(
    method: str,
    pop: Population,
    out: Arena,
    groups: list[TensorGroup],
    base: Base | None = None,
    *,
    seed: int = 0,
    backend: str | None = None,
    stats: Any = None,
    chunk: int = 1 << 22,
) -> Arena:
    """Merges each group of tensors with its own settings and weights (mergekit's per-tensor parameters:
    gradients over layers, filters by name). One group of every tensor is exactly Merger(...)(pop, out);
    otherwise each group runs on views of its tensors only, at their global indices, so random drops and
    chunking are those of the whole merge."""
    if len(groups) == 1 and len(groups[0][0]) == len(pop.layout.entries):
        _, settings, weights = groups[0]
        return Merger(method, base, weights=weights, seed=seed, backend=backend, stats=stats, **settings)(
            pop, out, chunk
        )
    if stats is not None:
        raise ValueError(f"{method} merges with statistics of whole models: per-tensor parameters are not supported")
    for entries, settings, weights in groups:
        layout = pop.layout.subset(entries)
        if isinstance(base, Arena):
            view = Arena(layout, base.buffers)
        else:  # no base, or a reader of the base's files (global indices, as the population's)
            view = None if base is None else _Tensors(base, layout)
        merger = Merger(method, view, weights=weights, seed=seed, backend=backend, **settings)
        merger(_Tensors(pop, layout), Arena(layout, out.buffers), chunk)
    return out


def compute_statistics(
    method: str,
    settings: dict,
    model,
    layout: Layout,
    load: Callable[[int], None],
    n: int,
    evaluator,
    save_to: str | None = None,
    progress=None,
) -> Any:
    """The statistics `method` merges with, for individuals 0 .. n-1 (load(k) puts individual k into `model`),
    estimated on `evaluator`'s dev data; with `save_to`, also written there atomically (load_statistics reads
    them back). None for a method without statistics."""
    record = methods.get(method)
    if record.statistics is None:
        return None
    stats = record.statistics.estimate(model, layout, load, n, evaluator, settings, progress=progress)
    if save_to:
        tmp = save_to + ".tmp"
        record.statistics.save(stats, tmp)
        os.replace(tmp, save_to)
    return stats


def load_statistics(method: str, settings: dict, layout: Layout, n: int, path: str) -> Any:
    """compute_statistics' result from the file it saved."""
    return methods.get(method).statistics.load_file(layout, n, path, settings)
