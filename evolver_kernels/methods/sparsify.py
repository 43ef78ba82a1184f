"""Sparsified task-vector methods with mergekit 0.1.5's semantics (della's passes in methods/della.py, registered
here with the others) and parameter names: Model Breadcrumbs
(breadcrumbs, breadcrumbs_ties), DELLA (della, della_linear) and SCE (sce). tau_k = x_k - base, w_k the
per-model weights (1 each by default), everything per tensor:

  breadcrumbs        mergekit's magnitude_outliers on each tau_k: with n elements, keep = int(density n),
                     top = int(gamma n), the tau_k elements of descending magnitude rank in
                     [top', top' + keep) are kept, top' = min(top, n - keep) (the `gamma` largest are dropped
                     unless that would leave fewer than `keep`), the rest zeroed; density >= 1 keeps tau_k
                     whole (gamma then drops nothing, as in mergekit). out = base + scale * sum_k w_k tau'_k
  breadcrumbs_ties   the same band, then TIES' sign election on the w_k tau'_k (+ where their sum is >= 0) and
                     out = base + scale * (the sum of the agreeing w_k tau'_k) (mergekit's normalize: false)
  della              mergekit's della_magprune on each tau_k with density < 1, row by row (a 1-d tensor is one
                     row): r the element's magnitude rank in its row (0 the smallest, C - 1 the largest, C the row
                     length), kept with probability p = density - epsilon + 2 epsilon r / (C - 1); with rescale
                     (the default) the kept tau_k is scaled to the L1 norm of the whole tau_k (mergekit's
                     rescale_norm l1: sum|tau_k| / sum|kept tau_k|, unless either is below 1e-7). Then TIES'
                     election and out = base + scale * sum_agreeing w_k tau'_k / sum_agreeing w_k (0 where none
                     agrees; mergekit's normalize: true)
  della_linear       the same drops, out = base + scale * sum_k w_k tau'_k (normalize: false; true divides
                     by sum_k w_k)
  epsilon 0          every element kept with probability density, no ranks (any tensor shape, spans of any
                     length): mergekit's dare_linear / dare_ties (bernoulli, L1 rescale) are della_linear /
                     della with epsilon 0 and normalize false, which is how merge/config.py reads their YAML
  sce                with select_topk < 1: the elements where the tau_k vary most across models are kept in
                     every tau_k, zeroed elsewhere: var = the population variance over the models (in fp32: the
                     mean first, then the mean of the squared deviations, reference.variance_reference), the
                     k = int(select_topk * count of non-zero var) largest var per tensor (k = 0: none). Then
                     the elected sign of sum_k tau_k (unweighted), model weights c_k = mean(tau_k^2) / sum_j
                     mean(tau_j^2) (1/N each where that sum is below 1e-6), and
                     out = base + sum_agreeing c_k tau_k / max(sum_agreeing c_k, 1e-6)

Streaming: per-tensor reductions in fp32 over chunks first, then one element-wise pass writing the output
chunk by chunk; never a stack of the N models, never a mask of a tensor or of the model:
- breadcrumbs: both magnitude thresholds of each tau_k found exactly as TIES' are
  (selection.kth_largest_magnitudes: the two k's in the same passes); kept is lo <= |tau| < hi.
- della: pass 1 (with rescale) sums |tau_k| and |kept tau_k| per tensor; pass 2 merges. Both work on spans of
  whole rows of about chunk / N elements (a longer row is still read whole: della's memory is
  O(max(chunk, N row))): pass 1 decides the span's drops by rank (kernels/ranks.py: on the CPU a bucket of one
  magnitude ranks by index, a bucketed rank bound settles almost every other element, no sort) and keeps them
  as bits (1 bit an element, kernels/drop_bits.py), which its L1 sums read without drawing the words again;
  pass 2 expands them into per-element drop thresholds (int64: 2**32 or 0, one buffer per model) for the
  fused operator; without rescale pass 2 decides them itself. With every epsilon 0 the thresholds are one
  constant per model and no rank is needed.
- sce: the variance threshold in the histogram's two passes (non-zero variances counted in the first), one pass
  for the mean squares, then the merge; each pass computes the variance of a chunk from the N chunks read
  (kernels/variance.py: on the CPU one kernel reads the N models and the base once and writes only the fp32
  variance; the mean-square pass holds N fp32 task vectors, on chunks of chunk / N elements).
The element-wise passes are the fused merge operator (merge_tensors, every backend, the same bits):
breadcrumbs as the band trim_k <= |tau_k| < top_k with or without TIES' election; della as per-element drop
thresholds (`drop_thresholds`, from the ranks above) with each model's L1 factor (`drop_rescales`); sce as
the variance selection (`select`), the election on the unweighted task vectors (`elect_weights` 1) and the
divisor floor (`min_den`).

Where ours differs from mergekit, on purpose:
- della's drops come from the package's Philox contract, not torch.bernoulli: model k's element j (its global
  arena index) is dropped where Philox word (seed, stream STREAM_DARE + k, j) < floor(q 2**32), q = 1 - p
  computed in fp64 (DARE's draws: della with epsilon 0 drops exactly the elements dare with drop_p = 1 - density
  drops). Reproducible on every backend, never stored; mergekit's draws are torch's and differ run to run.
- Magnitude ties: breadcrumbs keeps or drops every element whose magnitude equals a threshold, sce keeps every
  element whose variance equals its threshold (mergekit's sort/topk picks among them arbitrarily); della ranks
  tied magnitudes by their index in the row (mergekit's argsort: arbitrarily). A della row of one element (a
  tensor [n, 1]) is kept with probability density (mergekit fails there: its rank normalisation is 0 / 0); a
  della tensor of more than two dimensions is refused (mergekit ranks it along dimension 1).
- Sums and norms: reductions in fp64 over fp32 values, scale factors rounded once to fp32, the element-wise
  pass in fp32 in slot order with one rounding to the arena's dtype (mergekit computes in the inputs' dtype and
  sums in fp32). On float32 inputs the results agree to fp32 rounding (tests/test_mergekit_sparsify.py).
- Parameters: mergekit's names (density, gamma, epsilon, lambda = our scale, rescale, select_topk, per-model
  weight). `density`, `gamma` and `epsilon` may be given per model, as in mergekit. breadcrumbs and della
  take mergekit's `normalize` (default true for della, false for the others); sce merges with mergekit's
  default (false); della's `rescale` may be turned off; breadcrumbs has no `rescale` (mergekit's default false
  only). sce takes no weights (mergekit's sce ignores them; we refuse them).
"""

from __future__ import annotations

import torch

from evolver_kernels.kernels.gram import add_task_vector_squares
from evolver_kernels.kernels.ops import merge_tensors
from evolver_kernels.kernels.rng import STREAM_DARE
from evolver_kernels.kernels.variance import task_vector_variance
from evolver_kernels.methods.della import (
    EPSILON,
    RESCALE,
    della,
)
from evolver_kernels.methods.registry import MergeContext, MergeMethod, Param, register
from evolver_kernels.methods.selection import kth_largest_magnitudes
from evolver_kernels.methods.streaming import (
    Base,
    base_chunk,
    check_base,
    check_weights,
    per_model_chunk,
    prefetched,
    read_all,
)
from evolver_kernels.methods.task_vectors import (
    DENSITY,
    NORMALIZE,
    SCALE,
    densities_of,
    normalize_of,
    per_model_values,
)
from evolver_kernels.storage.arena import Arena, Entry, iter_chunks
from evolver_kernels.storage.population import Population

GAMMA = Param(
    "gamma",
    float,
    0.01,
    "breadcrumbs: fraction of each task vector's largest magnitudes dropped, per "
    "tensor (the outliers), before `density` is kept below them",
    low=0.0,
    high=1.0,
    per_model=True,
)
SELECT_TOPK = Param(
    "select_topk",
    float,
    1.0,
    "sce: fraction of each tensor's elements kept, those where the "
    "task vectors vary most across models (of the non-zero variances)",
    low=0.0,
    high=1.0,
)

INF = float("inf")
SCE_WEIGHT_EPS = 1e-6  # mergekit's sce_weight: uniform weights when the mean squares sum below it
SCE_DIVISOR_MIN = 1e-6  # mergekit's sce: the agreeing weights' sum is clamped to at least this


# -- breadcrumbs ---------------------------------------------------------------------------------------------


def breadcrumbs_band(numel: int, density: float, gamma: float) -> tuple[int, int] | None:
    """(top', keep): mergekit's magnitude_outliers keeps the elements of descending magnitude rank in
    [top', top' + keep); None where it keeps the tensor whole (density >= 1)."""
    if density >= 1:
        return None
    keep = int(density * numel)
    bottom = max(0, numel - keep - int(gamma * numel))
    return numel - bottom - keep, keep


def breadcrumbs(
    pop: Population,
    base: Base,
    out: Arena,
    density: float | list[float] = 1.0,
    gamma: float | list[float] = 0.01,
    scale: float = 1.0,
    weights: list[float] | None = None,
    ties: bool = False,
    chunk: int = 1 << 22,
    backend: str | None = None,
    normalize: bool = False,
) -> Arena:
    """Model Breadcrumbs (ties=True: with TIES' sign election), tensor by tensor: each task vector's magnitude
    band (drop the `gamma` largest, keep `density` below them), then one element-wise pass (normalize: divided
    by the weights summed, of the agreeing models with ties)."""
    base = check_base(pop, base, "breadcrumbs")
    n = pop.size
    densities = densities_of(density, n)
    gammas = per_model_values(gamma, n, "gamma", 0.0, 1.0)
    w = check_weights(weights, n)
    for e in prefetched(pop, base):
        if e.numel == 0:
            continue
        dst = out.view(e).view(-1)  # the entry's elements, on the device that holds them
        bounds: list[tuple[float, float] | None] = []
        for k in range(n):
            band = breadcrumbs_band(e.numel, densities[k], gammas[k])
            if band is None:
                bounds.append(None)
                continue
            top, keep = band
            if keep == 0:
                bounds.append((INF, INF))  # nothing kept
                continue
            ks = ([top] if top > 0 else []) + ([top + keep] if top + keep < e.numel else [])

            def task_vector(a, b, k=k, e=e, device=dst.device):  # (x_k, base): the histogram forms x_k - base
                return pop.read(k, e.group, a, b).to(device), base_chunk(base, e.group, a, b, device)

            found = kth_largest_magnitudes(task_vector, e.offset, e.offset + e.numel, ks, chunk)
            high = found.pop(0) if top > 0 else INF
            bounds.append((found[0] if found else 0.0, high))
        band = any(b is not None for b in bounds)
        upper = any(b is not None and b[1] < INF for b in bounds)
        _fused(
            pop,
            base,
            out,
            e,
            w,
            [0.0 if b is None else b[0] for b in bounds] if band else None,
            [INF if b is None else b[1] for b in bounds] if upper else None,
            ties,
            scale,
            chunk,
            backend,
            normalize,
        )
    return out


def _fused(
    pop: Population,
    base: Base,
    out: Arena,
    e: Entry,
    w: list[float],
    trim: list[float] | None,
    top: list[float] | None,
    elect: bool,
    scale: float,
    chunk: int,
    backend: str | None,
    normalize: bool,
) -> None:
    """Breadcrumbs' element-wise pass of entry `e` through the fused operator: each task vector cut to its band
    trim_k <= |tau| < top_k, then summed (elect: TIES' sum of the agreeing)."""
    dst = out.view(e).view(-1)
    start = pop.layout.groups[e.group][0]
    for lo, hi in iter_chunks(e.numel, chunk):
        a, b = e.offset + lo, e.offset + hi
        merge_tensors(
            [pop.read(k, e.group, a, b).to(dst.device) for k in range(pop.size)],
            base=base_chunk(base, e.group, a, b, dst.device),
            weights=w,
            trim=trim,
            top=top,
            elect=elect,
            scale=scale,
            normalize=normalize,
            offset=start + a,
            out=dst[lo:hi],
            backend=backend,
            stream=STREAM_DARE,
        )


# -- sce -------------------------------------------------------------------------------------------------------


def sce(
    pop: Population, base: Base, out: Arena, select_topk: float = 1.0, chunk: int = 1 << 22, backend: str | None = None
) -> Arena:
    """SCE: select the elements of highest variance across the task vectors (select_topk < 1), weight each
    model by its mean square, elect signs, weighted mean of the agreeing; tensor by tensor."""
    base = check_base(pop, base, "sce")
    if not 0.0 <= select_topk <= 1.0:
        raise ValueError(f"select_topk must be in [0, 1], got {select_topk}")
    n = pop.size
    work = per_model_chunk(chunk, n)  # the reduction passes form N fp32 task vectors

    def variances(e: Entry, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        """The variance over the models of the task vectors on elements [lo, hi) of entry e (fp32)."""
        a, b = e.offset + lo, e.offset + hi
        return task_vector_variance(read_all(pop, e.group, a, b, device), base_chunk(base, e.group, a, b, device))

    def ks(nonzero: int) -> list[int]:
        k = int(nonzero * select_topk)
        return [k] if k > 0 else []

    for e in prefetched(pop, base):
        if e.numel == 0:
            continue
        dst = out.view(e).view(-1)
        threshold = None
        if select_topk < 1:
            found = kth_largest_magnitudes(
                lambda a, b, e=e, device=dst.device: variances(e, a - e.offset, b - e.offset, device),
                e.offset,
                e.offset + e.numel,
                ks,
                work,
            )
            threshold = found[0] if found else INF
        squares = torch.zeros(n, dtype=torch.float64, device=dst.device)
        for lo, hi in iter_chunks(e.numel, work):
            a, b = e.offset + lo, e.offset + hi
            xs = read_all(pop, e.group, a, b, dst.device)
            add_task_vector_squares(squares, xs, base_chunk(base, e.group, a, b, dst.device), threshold)
        means = squares / e.numel
        total = float(means.sum())
        c = [1.0 / n] * n if abs(total) < SCE_WEIGHT_EPS else [float(m) / total for m in means]
        start = pop.layout.groups[e.group][0]
        for lo, hi in iter_chunks(e.numel, chunk):
            a, b = e.offset + lo, e.offset + hi
            # the sign elected on the unweighted task vectors (mergekit's sce), the c-weighted mean of the agreeing
            merge_tensors(
                [pop.read(k, e.group, a, b).to(dst.device) for k in range(n)],
                base=base_chunk(base, e.group, a, b, dst.device),
                weights=c,
                elect=True,
                elect_weights=[1.0] * n,
                select=threshold,
                min_den=SCE_DIVISOR_MIN,
                offset=start + a,
                out=dst[lo:hi],
                backend=backend,
            )
    return out


# -- records ---------------------------------------------------------------------------------------------------


def _breadcrumbs(ties: bool):
    def merge(pop: Population, out: Arena, ctx: MergeContext) -> Arena:
        s = ctx.settings
        return breadcrumbs(
            pop,
            ctx.base,
            out,
            s["density"],
            s["gamma"],
            s["scale"],
            ctx.weights,
            ties,
            ctx.chunk,
            ctx.backend,
            normalize_of(ctx, False),
        )

    return merge


def _della(ties: bool):
    def merge(pop: Population, out: Arena, ctx: MergeContext) -> Arena:
        s = ctx.settings
        return della(
            pop,
            ctx.base,
            out,
            s["density"],
            s["epsilon"],
            s["scale"],
            ctx.weights,
            ties,
            s["rescale"],
            ctx.seed,
            ctx.chunk,
            ctx.backend,
            normalize_of(ctx, ties),
        )

    return merge


def _sce(pop: Population, out: Arena, ctx: MergeContext) -> Arena:
    return sce(pop, ctx.base, out, ctx.settings["select_topk"], ctx.chunk, ctx.backend)


register(
    MergeMethod(
        writes_views=True,
        name="breadcrumbs",
        params=(SCALE, DENSITY, GAMMA, NORMALIZE),
        needs_base=True,
        merge=_breadcrumbs(False),
        summary="task arithmetic on task vectors cut to a magnitude band per tensor: the `gamma` largest dropped, "
        "`density` kept below them",
    )
)
register(
    MergeMethod(
        writes_views=True,
        name="breadcrumbs_ties",
        params=(SCALE, DENSITY, GAMMA, NORMALIZE),
        needs_base=True,
        merge=_breadcrumbs(True),
        summary="breadcrumbs' magnitude band, then TIES' sign election: the sum of the agreeing",
    )
)
register(
    MergeMethod(
        writes_views=True,
        name="della",
        params=(SCALE, DENSITY, EPSILON, RESCALE, NORMALIZE),
        needs_base=True,
        merge=_della(True),
        summary="DELLA: task-vector elements dropped with probabilities by magnitude rank in their row (mean "
        "`density`), L1-rescaled, TIES' election, mean of the agreeing",
    )
)
register(
    MergeMethod(
        writes_views=True,
        name="della_linear",
        params=(SCALE, DENSITY, EPSILON, RESCALE, NORMALIZE),
        needs_base=True,
        merge=_della(False),
        summary="DELLA's drops, then task arithmetic (the weighted sum)",
    )
)
register(
    MergeMethod(
        writes_views=True,
        name="sce",
        params=(SELECT_TOPK,),
        needs_base=True,
        merge=_sce,
        uses_weights=False,
        summary="SCE: the `select_topk` elements of highest variance across the task vectors, sign election, mean "
        "of the agreeing weighted by each task vector's mean square",
    )
)

__all__ = ["breadcrumbs", "breadcrumbs_band", "sce"]
