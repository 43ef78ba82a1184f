"""Spherical merges, with mergekit 0.1.5's semantics and parameter names: slerp, nuslerp, multislerp and the
Karcher mean. Each result is a linear combination of the models' vectors v_k (x_k, or x_k - base where a base is
used) whose coefficients depend only on their dot products, so each tensor is merged in two streaming passes
(geometry.py): its Gram matrix G_ij = <v_i, v_j> (per tensor, or per row/column for nuslerp without flatten),
then one element-wise pass out = [base +] sum_k c_k v_k, through the fused operator merge_tensors where the
c_k are per tensor. The formulas, with n_k = |v_k| and theta the angle between unit vectors:

  slerp       two models, x_0 (mergekit's base_model) and x_1, one angle per tensor:
              n_k -> 1 where n_k <= 1e-8; cos = <x_0, x_1> / (n_0 n_1) clamped to [-1, 1];
              out = sin((1-t) theta)/sin(theta) x_0 + sin(t theta)/sin(theta) x_1,
              (1-t) x_0 + t x_1 where |cos| > 0.9995
  nuslerp     two models with weights w_0, w_1: t = w_1 / (w_0 + w_1) (0.5 when the sum is below 1e-6);
              v_k = x_k - base with a base, else x_k; unit vectors u_k = v_k / max(n_k, 1e-7);
              out = [base +] (sin((1-t) theta) v_0 + sin(t theta) v_1) / sin(theta), the linear
              (1-t) v_0 + t v_1 where 1 - cos^2 <= 1e-16; one angle per tensor (nuslerp_flatten, the default),
              else per vector along the last dimension (rows), or along the first (nuslerp_row_wise: columns)
  multislerp  N models, weights w (divided by their sum with normalize_weights), per tensor:
              u_k = v_k / (n_k + eps); m = sum w_k u_k, normalized; the tangent r = sum w_k (u_k - <u_k, m> m);
              out = [base +] (sum w_k n_k) (cos|r|' m + sin|r|' / |r|' r), |r|' = |r| + eps; when |m| < eps,
              two models give [base +] w_0 v_0 + w_1 v_1 and more are refused
  karcher     N models, uniform alpha_k = 1/N, per tensor: the weighted Karcher (Frechet) mean of the units
              u_k = x_k / n_k on the sphere, by at most max_iter Riemannian gradient steps from the normalized
              Euclidean mean, stopping when the step is below tol; models with n_k <= tol are left out of the
              mean (not of the scale); out = (sum alpha_k n_k) * mean

Where ours differs from mergekit, on purpose:
- Streaming: mergekit holds the whole tensors of every model (multislerp stacks them); we keep an N x N Gram
  matrix per tensor (per row/column) and run the angles, the multislerp projection and the Karcher iterations
  on it in float64, which is exact algebra on the same quantities: the iterates stay in the span of the u_k.
- Dot products are formed in fp32 and summed in fp64 over chunks (mergekit sums fp32 products in fp32, in
  another order); the scalar coefficients are computed in fp64 and rounded once to fp32 (mergekit computes
  them in fp32) and the output is rounded once to the arena's dtype. Inputs in bfloat16 are computed in fp32
  (mergekit's multislerp and nuslerp would compute in the inputs' dtype). The results agree to fp32 rounding.
- The thresholds (slerp's 0.9995, nuslerp's colinearity, karcher's tol, multislerp's eps) are tested on fp64
  values: a pair within a rounding of a threshold may take the other branch; both branches agree there to
  first order.
- The Gram sums run in another order on a GPU than on the CPU; in fp64 that changes the fp32 coefficients
  only where a sum lands within an fp64 rounding of an fp32 rounding boundary, so results across devices
  are equal in practice but not guaranteed bit for bit (the linear methods' fused operator is).
- Weights: mergekit requires nuslerp's and multislerp's per-model `weight`; here they default to 1 each, and
  must be non-negative with a positive sum (the package's weight rule). slerp and karcher take no weights (mergekit
  ignores a per-model weight there; we refuse it).
"""

from __future__ import annotations

import math

import torch

from evolver_kernels.methods.geometry import combine, gram, vector_count
from evolver_kernels.methods.registry import MergeContext, MergeMethod, Param, boolean, register
from evolver_kernels.methods.streaming import Base, check_weights, prefetched
from evolver_kernels.storage.arena import Arena
from evolver_kernels.storage.population import Population

T = Param(
    "t",
    float,
    0.5,
    "slerp: where between the first model (t = 0) and the second (t = 1); outside [0, 1] "
    "extrapolates. nearswap: the distance scale, each element taking weight min(1, t / |base - x|) of the "
    "model (t <= 0: the base)",
    search=(0.0, 1.0),
)
NUSLERP_FLATTEN = Param(
    "nuslerp_flatten",
    boolean,
    True,
    "nuslerp: one angle per tensor (flattened); false: one per row, or per column with nuslerp_row_wise",
)
NUSLERP_ROW_WISE = Param(
    "nuslerp_row_wise",
    boolean,
    False,
    "nuslerp without flatten: interpolate the vectors "
    "along the first dimension (W[:, j], mergekit's dim 0) instead of the rows W[i, :]",
)
NORMALIZE_WEIGHTS = Param("normalize_weights", boolean, True, "multislerp: divide the weights by their sum")
EPS = Param("eps", float, 1e-8, "multislerp: the small constant added to norms", low=0.0, low_open=True)
MAX_ITER = Param("max_iter", int, 10, "karcher: the most Riemannian gradient steps per tensor", low=0)
TOL = Param("tol", float, 1e-5, "karcher: stop when a step is shorter; models of norm below it are left out", low=0.0)

SLERP_DOT_THRESHOLD = 0.9995  # mergekit's: above it slerp interpolates linearly
SLERP_EPS = 1e-8  # mergekit's: norms at most this count as 1
NUSLERP_NORM_MIN = 1e-7  # mergekit's clamp of the norms nuslerp divides by
NUSLERP_EPS = 1e-8  # mergekit's: colinear where 1 - cos^2 <= eps^2


def _two(pop: Population, method: str) -> None:
    if pop.size != 2:
        raise ValueError(f"{method} merges exactly two models, got {pop.size}")


def _interpolation(t: float, theta: torch.Tensor, linear: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients of the two endpoints: sin((1-t) theta)/sin(theta), sin(t theta)/sin(theta), or 1-t and t
    where `linear`."""
    theta = torch.where(linear, torch.zeros_like(theta), theta)  # keeps the unselected branch finite
    sin = torch.sin(theta)
    safe = torch.where(linear, torch.ones_like(sin), sin)
    c0 = torch.where(linear, torch.full_like(theta, 1 - t), torch.sin((1 - t) * theta) / safe)
    c1 = torch.where(linear, torch.full_like(theta, t), torch.sin(t * theta) / safe)
    return c0, c1


def slerp_coefficients(g: torch.Tensor, t: float) -> torch.Tensor:
    """[vectors, 2] coefficients of slerp from Gram matrices [vectors, 2, 2] (mergekit's slerp)."""
    norms = g.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()
    norms = torch.where(norms > SLERP_EPS, norms, torch.ones_like(norms))
    dot = (g[:, 0, 1] / (norms[:, 0] * norms[:, 1])).clamp(-1, 1)
    c0, c1 = _interpolation(t, torch.acos(dot), dot.abs() > SLERP_DOT_THRESHOLD)
    return torch.stack([c0, c1], dim=1)


def nuslerp_coefficients(g: torch.Tensor, t: float) -> torch.Tensor:
    """[vectors, 2] coefficients of nuslerp from Gram matrices [vectors, 2, 2] (mergekit's nuslerp)."""
    norms = g.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt().clamp(min=NUSLERP_NORM_MIN)
    cos = (g[:, 0, 1] / (norms[:, 0] * norms[:, 1])).clamp(-1, 1)
    c0, c1 = _interpolation(t, torch.acos(cos), (1 - cos.square()) <= NUSLERP_EPS**2)
    return torch.stack([c0, c1], dim=1)


def multislerp_coefficients(
    g: torch.Tensor, weights: list[float], normalize_weights: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """[N] coefficients of multislerp on v_k from one Gram matrix [N, N] (mergekit's multislerp)."""
    n = g.shape[0]
    w = torch.tensor(weights, dtype=torch.float64, device=g.device)
    if normalize_weights:
        w = w / w.sum()
    norms = g.diagonal().clamp(min=0).sqrt()
    a = w / (norms + eps)  # the weighted mean of the units u_k = v_k / (n_k + eps), on the v_k
    mean_norm = float(a @ g @ a) ** 0.5 if float(a @ g @ a) > 0 else 0.0
    if mean_norm < eps:
        if n == 2:
            return w
        raise ValueError(
            "multislerp: the weighted sum of the models' unit vectors is zero in a tensor (antipodal "
            "models with balancing weights); give other weights"
        )
    m = a / mean_norm
    dots = (g @ m) / (norms + eps)
    tangent = a - (w * dots).sum() * m
    tangent_norm = max(float(tangent @ g @ tangent), 0.0) ** 0.5 + eps
    return (math.cos(tangent_norm) * m + math.sin(tangent_norm) / tangent_norm * tangent) * (norms * w).sum()


def karcher_coefficients(g: torch.Tensor, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """[N] coefficients of the Karcher mean on x_k from one Gram matrix [N, N] (mergekit's karcher with uniform
    weights): the mean is kept as coordinates on the unit vectors u_k, their Gram matrix U."""
    n = g.shape[0]
    alphas = [1.0 / n] * n
    norms = g.diagonal().clamp(min=0).sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    units = torch.where((norms > 0)[:, None] & (norms > 0)[None, :], g / (safe[:, None] * safe[None, :]), 0.0)
    valid = [k for k in range(n) if float(norms[k]) > tol]
    if not valid:
        return torch.zeros(n, dtype=torch.float64, device=g.device)
    total = sum(alphas[k] for k in valid)
    weight = {k: alphas[k] / total for k in valid}

    def norm(c: torch.Tensor) -> float:
        return max(float(c @ units @ c), 0.0) ** 0.5

    mean = torch.zeros(n, dtype=torch.float64, device=g.device)
    for k in valid:
        mean[k] = weight[k]
    mean_norm = norm(mean)
    if mean_norm < tol:
        mean = torch.zeros_like(mean)
        mean[valid[0]] = 1.0
    else:
        mean = mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        dots = mean @ units
        for k in valid:
            dot = min(max(float(dots[k]), -1.0), 1.0)
            theta = math.acos(dot)
            if theta < tol:
                continue
            step = -dot * mean
            step[k] += 1.0
            tangent += weight[k] * (theta / math.sin(theta)) * step
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = norm(mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = float(sum(a * float(r) for a, r in zip(alphas, norms)))
    return scale * mean / safe


def _spherical(
    pop: Population,
    out: Arena,
    coefficients,
    *,
    base: Base | None = None,
    along: int | None = None,
    chunk: int = 1 << 22,
    backend: str | None = None,
) -> Arena:
    """Entry by entry: the Gram matrices, `coefficients(g)` -> [vectors, N], then the element-wise pass."""
    for e in prefetched(pop, base):
        if e.numel == 0:
            continue
        c = coefficients(gram(pop, base, e, along, chunk, out.view(e).device))
        combine(pop, base, out, e, along, c.reshape(vector_count(e, along), pop.size), chunk, backend)
    return out


def slerp(pop: Population, out: Arena, t: float, chunk: int = 1 << 22, backend: str | None = None) -> Arena:
    """Spherical interpolation from model 0 (t = 0) to model 1 (t = 1), one angle per tensor."""
    _two(pop, "slerp")
    return _spherical(pop, out, lambda g: slerp_coefficients(g, float(t)), chunk=chunk, backend=backend)


def nuslerp(
    pop: Population,
    out: Arena,
    weights: list[float] | None = None,
    base: Base | None = None,
    flatten: bool = True,
    row_wise: bool = False,
    chunk: int = 1 << 22,
    backend: str | None = None,
) -> Arena:
    """Slerp of two models (of their task vectors with a base) at t = w_1 / (w_0 + w_1); one angle per tensor
    (flatten), else per row, or per column (row_wise)."""
    _two(pop, "nuslerp")
    w = check_weights(weights, 2)
    total = w[0] + w[1]
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    along = None if flatten else 0 if row_wise else -1
    return _spherical(
        pop, out, lambda g: nuslerp_coefficients(g, t), base=base, along=along, chunk=chunk, backend=backend
    )


def multislerp(
    pop: Population,
    out: Arena,
    weights: list[float] | None = None,
    base: Base | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    chunk: int = 1 << 22,
    backend: str | None = None,
) -> Arena:
    """Barycentric interpolation of N models (task vectors with a base) on the hypersphere, per tensor."""
    w = check_weights(weights, pop.size)
    return _spherical(
        pop,
        out,
        lambda g: multislerp_coefficients(g[0], w, normalize_weights, eps),
        base=base,
        chunk=chunk,
        backend=backend,
    )


def karcher(
    pop: Population, out: Arena, max_iter: int = 10, tol: float = 1e-5, chunk: int = 1 << 22, backend: str | None = None
) -> Arena:
    """The Karcher mean of N models on the hypersphere, per tensor, scaled by their mean norm."""
    return _spherical(pop, out, lambda g: karcher_coefficients(g[0], max_iter, tol), chunk=chunk, backend=backend)


def _slerp(pop: Population, out: Arena, ctx: MergeContext) -> Arena:
    return slerp(pop, out, ctx.settings["t"], ctx.chunk, ctx.backend)


def _nuslerp(pop: Population, out: Arena, ctx: MergeContext) -> Arena:
    s = ctx.settings
    return nuslerp(pop, out, ctx.weights, ctx.base, s["nuslerp_flatten"], s["nuslerp_row_wise"], ctx.chunk, ctx.backend)


def _multislerp(pop: Population, out: Arena, ctx: MergeContext) -> Arena:
    s = ctx.settings
    return multislerp(pop, out, ctx.weights, ctx.base, s["normalize_weights"], s["eps"], ctx.chunk, ctx.backend)


def _karcher(pop: Population, out: Arena, ctx: MergeContext) -> Arena:
    return karcher(pop, out, ctx.settings["max_iter"], ctx.settings["tol"], ctx.chunk, ctx.backend)


TWO_MODELS = "it merges exactly two models, and a population merge takes every individual"

register(
    MergeMethod(
        writes_views=True,
        name="slerp",
        params=(T,),
        merge=_slerp,
        max_models=2,
        uses_weights=False,
        yaml_base="first",
        evolve_refusal=TWO_MODELS,
        summary="spherical interpolation from the first model (t = 0) to the second (t = 1), one angle per tensor",
    )
)
register(
    MergeMethod(
        writes_views=True,
        name="nuslerp",
        params=(NUSLERP_FLATTEN, NUSLERP_ROW_WISE),
        merge=_nuslerp,
        optional_base=True,
        max_models=2,
        evolve_refusal=TWO_MODELS,
        summary="slerp of two models (of their task vectors with a base) at t = w_1 / (w_0 + w_1), per tensor, row "
        "or column",
    )
)
register(
    MergeMethod(
        writes_views=True,
        name="multislerp",
        params=(NORMALIZE_WEIGHTS, EPS),
        merge=_multislerp,
        optional_base=True,
        summary="weighted barycentre of N models (task vectors with a base) on the hypersphere, scaled by the "
        "weighted mean norm",
    )
)
register(
    MergeMethod(
        writes_views=True,
        name="karcher",
        params=(MAX_ITER, TOL),
        merge=_karcher,
        uses_weights=False,
        yaml_base="input",
        summary="Karcher mean of the models on the hypersphere (iterated per tensor), scaled by their mean norm",
    )
)
