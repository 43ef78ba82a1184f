"""Model Stock (Jang et al. 2024, https://arxiv.org/abs/2403.19522) with mergekit 0.1.5's semantics: the
average of N >= 2 fine-tunes pulled towards their base by how aligned their task vectors are.

  d_k = x_k - base;  cos = the mean over pairs i < j of <d_i, d_j> / max(|d_i| |d_j|, 1e-6), each clamped to
  [-1, 1];  t = N cos / (1 + (N - 1) cos) (0 where |1 + (N - 1) cos| < 1e-6: the base is kept);
  out = t * (sum_k x_k / N) + (1 - t) * base = base + (t / N) sum_k d_k

per tensor, or with filter_wise per row (per vector along the last dimension; a 1-d tensor is one row).

Streamed in two passes (geometry.py): the Gram matrix of the d_k per tensor (per row) over chunks, then one
element-wise pass, through the fused operator merge_tensors with the scalar weights t / N per tensor, or fp32
torch computing mergekit's t * mean + (1 - t) * base per row. Where ours differs from mergekit, on purpose: the
dot products are formed in fp32 and summed in fp64 over chunks, t is computed in fp64 and rounded once (mergekit:
fp32 throughout, in the inputs' dtype), and a per-tensor result is computed as base + (t / N) sum_k d_k rather
than t * mean + (1 - t) * base, equal up to fp32 rounding. mergekit's model_stock takes no weights; neither does
ours (a per-model weight is refused).
"""

from __future__ import annotations

import torch

from evolver_kernels.methods.geometry import (
    combine,
    gram,
    matrix_of,
    per_element,
    read_span,
    shaped,
    spans,
    vector_count,
)
from evolver_kernels.methods.registry import MergeContext, MergeMethod, Param, boolean, register
from evolver_kernels.methods.streaming import Base, check_base, prefetched
from evolver_kernels.storage.arena import Arena
from evolver_kernels.storage.population import Population

FILTER_WISE = Param("filter_wise", boolean, False, "model_stock: one ratio t per row (filter) instead of per tensor")

NORM_PRODUCT_MIN = 1e-6  # mergekit's clamp of |d_i| |d_j|
SINGULAR = 1e-6  # mergekit's: below it the denominator has no finite estimate and the base is kept


def model_stock_ratio(g: torch.Tensor) -> torch.Tensor:
    """t per vector from Gram matrices [vectors, N, N] of the task vectors (mergekit's model_stock)."""
    n = g.shape[1]
    norms = g.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()
    cosines = [
        (g[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=NORM_PRODUCT_MIN)).clamp(-1, 1)
        for i in range(n)
        for j in range(i + 1, n)
    ]
    cos = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR
    return torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denominator))


def model_stock(
    pop: Population, base: Base, out: Arena, filter_wise: bool = False, chunk: int = 1 << 22, backend: str | None = None
) -> Arena:
    """Model Stock of the population (N >= 2 fine-tunes) with its base, per tensor or per row (filter_wise)."""
    base = check_base(pop, base, "model_stock")
    if pop.size < 2:
        raise ValueError(f"model_stock merges at least two models besides the base, got {pop.size}")
    along = -1 if filter_wise else None
    n = pop.size
    for e in prefetched(pop, base):
        if e.numel == 0:
            continue
        dst = out.view(e).view(-1)
        t = model_stock_ratio(gram(pop, base, e, along, chunk, dst.device))
        if matrix_of(e, along) is None:
            combine(pop, base, out, e, along, (t / n)[:, None].expand(vector_count(e, along), n), chunk, backend)
            continue
        t32 = t.to(torch.float32)
        for span in spans(e, along, chunk):
            xs, b = read_span(pop, base, e, span, dst.device)
            tt = per_element(t32, e, along, span)
            total = shaped(xs[0].float(), e, along, span)
            for x in xs[1:]:
                total = total + shaped(x.float(), e, along, span)
            w0 = shaped(b.float(), e, along, span)
            dst[span.lo : span.hi] = (tt * (total / n) + (1 - tt) * w0).reshape(-1)  # mergekit's expression
    return out


def _model_stock(pop: Population, out: Arena, ctx: MergeContext) -> Arena:
    return model_stock(pop, ctx.base, out, ctx.settings["filter_wise"], ctx.chunk, ctx.backend)


register(
    MergeMethod(
        writes_views=True,
        name="model_stock",
        params=(FILTER_WISE,),
        needs_base=True,
        merge=_model_stock,
        uses_weights=False,
        summary="base + t (mean - base), t = N cos / (1 + (N-1) cos) from the mean pairwise cosine of the task vectors, "
        "per tensor or row",
    )
)
