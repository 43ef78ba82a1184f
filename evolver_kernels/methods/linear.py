"""The weighted average (model soup): out = sum_k w_k x_k / sum_k w_k, in one fused pass per chunk.
mergekit calls it `linear` (with its default normalize: true); the name is an alias here. And passthrough:
the copy of one model, with which mergekit's `slices` stack layers (merge/run.py builds the stacked inputs; mergekit's
per-input `scale` of passthrough is not supported)."""

from __future__ import annotations

from evolver_kernels.methods.registry import MergeContext, MergeMethod, register
from evolver_kernels.methods.streaming import check_weights, merge_linear
from evolver_kernels.storage.arena import Arena
from evolver_kernels.storage.population import Population


def average(
    pop: Population,
    out: Arena,
    weights: list[float] | None = None,
    chunk: int = 1 << 22,
    backend: str | None = None,
    fisher=None,
) -> Arena:
    """out = the weighted average of the population (uniform by default); with `fisher` (statistics.FisherStats)
    each element weighted by its model's Fisher as well."""
    return merge_linear(pop, out, chunk, backend, fisher=fisher, weights=check_weights(weights, pop.size))


def _merge(pop: Population, out: Arena, ctx: MergeContext) -> Arena:
    return average(pop, out, ctx.weights, ctx.chunk, ctx.backend)


def _passthrough(pop: Population, out: Arena, ctx: MergeContext) -> Arena:
    if pop.size != 1:
        raise ValueError(f"passthrough copies exactly one model, got {pop.size}")
    return merge_linear(pop, out, ctx.chunk, ctx.backend, weights=[1.0])  # x * 1 / 1: the exact copy


register(
    MergeMethod(
        writes_views=True,
        name="average",
        aliases=("linear",),
        merge=_merge,
        describe=lambda settings: "simple average",
        summary="weighted average of the models, sum w_k x_k / sum w_k (model soup)",
    )
)
register(
    MergeMethod(
        writes_views=True,
        name="passthrough",
        merge=_passthrough,
        min_models=1,
        max_models=1,
        uses_weights=False,
        copies=True,
        evolve_refusal="it copies one model (layer stacking with mergekit's slices: the merge CLI)",
        summary="the one model given, copied; with mergekit's `slices`, layers stacked from several models",
    )
)
