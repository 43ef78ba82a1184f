"""The weighted average (model soup): out = sum_k w_k x_k / sum_k w_k, in one fused pass per chunk.
mergekit calls it `linear` (with its default normalize: true); the name is an alias here."""

from __future__ import annotations

from ..arena import Arena
from ..population import Population
from .registry import MergeContext, MergeMethod, register
from .streaming import check_weights, merge_linear


def average(pop: Population, out: Arena, weights: list[float] | None = None, chunk: int = 1 << 22,
            backend: str | None = None, fisher=None) -> Arena:
    """out = the weighted average of the population (uniform by default); with `fisher` (statistics.FisherStats)
    each element weighted by its model's Fisher as well."""
    return merge_linear(pop, out, chunk, backend, fisher=fisher, weights=check_weights(weights, pop.size))


def _merge(pop: Population, out: Arena, ctx: MergeContext) -> Arena:
    return average(pop, out, ctx.weights, ctx.chunk, ctx.backend)


register(MergeMethod(
    name="average", aliases=("linear",), merge=_merge, describe=lambda settings: "simple average",
    summary="weighted average of the models, sum w_k x_k / sum w_k (model soup)",
))
