"""Reinforced Agent Merging with mergekit 0.1.5's semantics and parameter names: ram and ramplus_tl
(arXiv 2601.13572). tau_k = x_k - base for the N models, everything per tensor:

  nz_k(j)  = |tau_k(j)| > epsilon                  (model k changed element j)
  c(j)     = sum_k nz_k(j)                         (how many models changed it)
  ram        out(j) = base(j) + sum_k [nz_k(j)] (tau_k(j) if c(j) == 1, tau_k(j) / c(j) if c(j) > 1)
             an element only one model changed takes that model's change whole; one several models changed
             takes the mean of their changes; the changes at or below epsilon are left out (c(j) = 0: the base)
  ramplus_tl the same, with each model's unique changes (c(j) == 1) scaled by
             lambda_k = 1 + r clamp(rho_k, 0, alpha),  rho_k = S_k / max(U_k, epsilon),
             S_k = count_j [nz_k(j) and c(j) > 1], U_k = count_j [nz_k(j) and c(j) == 1], over the whole tensor
             (mergekit's "tensor-local" rescaling: the more of its changes a model shares, the more its unique
             ones are amplified). lambda_k is computed with mergekit's fp32 ops on the int64 counts
             (shared / unique.clamp(min=epsilon), then 1 + r * rho.clamp(min=0, max=alpha)), so the same bits.

Streaming, per tensor, chunk by chunk; never a stack of the N models and never a mask tensor of a tensor or of
the model (mergekit stacks the N task vectors of a tensor and builds [N, numel] masks): each chunk of every model
and of the base is read, tau_k, nz_k and c formed for that chunk only, in fp32, on the device that holds the
output (chunks of chunk / N elements, so the N task vectors of a chunk hold about one chunk's worth). ram is
one element-wise pass. ramplus_tl first counts S_k and U_k over the whole tensor in a pass over its chunks
(exact int64 counts), then runs the element-wise pass. Not a fused kernel (the fused operator
merge_tensors takes per-model scalar weights, and these are per element): plain fp32 torch on the chunk, the
sum over the models in slot order, one rounding to the arena's dtype.

Where ours differs from mergekit, on purpose:
- Inputs in bfloat16 / float16 are computed in fp32 and rounded once (mergekit computes in the inputs' dtype; on
  float32 inputs the expressions are mergekit's and the results agree to fp32 rounding,
  tests/test_mergekit_ram_fusion.py).
- Parameter names: mergekit's `epsilon` is our `ram_epsilon` and ramplus_tl's `alpha` our `ramplus_alpha`,
  each with mergekit's name as its alias, so a mergekit YAML's `parameters: {epsilon: ..., alpha: ...}` reads
  with mergekit's meaning. The registry gives a parameter name one meaning across methods, and `epsilon`
  (della's keep-probability spread, 0.15 in [0, 1), per model) and `alpha` (RegMean's off-diagonal factor, 0.5
  in [0, 1]) are taken: the merge CLI's flags are `--ram-epsilon` and `--ramplus-alpha` (evolve:
  `--merge-ram-epsilon`, `--merge-ramplus-alpha`); `--epsilon` and `--alpha` are della's and RegMean's flags.
  `r` keeps its name. Defaults are mergekit's (epsilon 1e-5, r 0.1, alpha 0.2); r and alpha take any finite
  number (mergekit: any number; alpha < 0 gives lambda 1 + r alpha, as torch.clamp does in both), epsilon must
  be >= 0 (mergekit takes a negative one, where every element, zeros included, counts as changed).
- ramplus_tl with epsilon 0 in a tensor where a model changed no element (S_k = U_k = 0): mergekit's rho_k is
  0 / 0, NaN, and NaN * 0 makes its whole merged tensor NaN; ours uses lambda_k = 1 wherever U_k = 0 (it
  scales no element there), so such a tensor merges as mergekit's would without the NaN.
- Per-model weights are refused (mergekit's ram has none); at least one model is merged (mergekit returns the
  base where a tensor has no other input).
"""

from __future__ import annotations

import torch

from evolver_kernels.methods.registry import MergeContext, MergeMethod, Param, register
from evolver_kernels.methods.streaming import Base, base_chunk, check_base, per_model_chunk, prefetched
from evolver_kernels.storage.arena import Arena, Entry, iter_chunks
from evolver_kernels.storage.population import Population

RAM_EPSILON = Param(
    "ram_epsilon",
    float,
    1e-5,
    "ram, ramplus_tl: a task-vector element counts as changed where its magnitude is above this (mergekit's epsilon)",
    low=0.0,
    aliases=("epsilon",),
)
R = Param(
    "r",
    float,
    0.1,
    "ramplus_tl: strength of the rescaling of each model's unique changes, lambda = 1 + r "
    "clamp(shared / unique, 0, alpha)",
)
RAMPLUS_ALPHA = Param(
    "ramplus_alpha",
    float,
    0.2,
    "ramplus_tl: upper clamp of the ratio of a model's shared to unique changes, per tensor (mergekit's alpha)",
    aliases=("alpha",),
)


def _task_vectors(
    pop: Population, base: Base, e: Entry, lo: int, hi: int, device: torch.device
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(base, [tau_k]) on elements [lo, hi) of entry `e`, in fp32."""
    a, b = e.offset + lo, e.offset + hi
    base_f = base_chunk(base, e.group, a, b, device).float()
    return base_f, [pop.read(k, e.group, a, b).to(device).float() - base_f for k in range(pop.size)]


def _changed(taus: list[torch.Tensor], epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([nz_k], c) of a chunk: where each task vector's magnitude is above epsilon, and how many are."""
    nz = [tau.abs() > epsilon for tau in taus]
    count = torch.zeros(taus[0].shape, dtype=torch.int64, device=taus[0].device)
    for m in nz:
        count += m
    return nz, count


def ramplus_lambdas(shared: torch.Tensor, unique: torch.Tensor, r: float, alpha: float, epsilon: float) -> list[float]:
    """lambda_k from the int64 counts S_k, U_k of a tensor, with mergekit's fp32 ops; 1 where U_k == 0."""
    rho = shared / unique.clamp(min=epsilon)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    return [1.0 if int(u) == 0 else float(v) for u, v in zip(unique, lam)]


def ram(
    pop: Population,
    base: Base,
    out: Arena,
    epsilon: float = 1e-5,
    plus: bool = False,
    r: float = 0.1,
    alpha: float = 0.2,
    chunk: int = 1 << 22,
    backend: str | None = None,
) -> Arena:
    """RAM (plus=True: RAM+ tensor-local, ramplus_tl) of the population's models into the base, tensor by
    tensor, chunk by chunk."""
    name = "ramplus_tl" if plus else "ram"
    base = check_base(pop, base, name)
    if pop.size < 1:
        raise ValueError(f"{name} merges at least one model into the base")
    if not epsilon >= 0:
        raise ValueError(f"{name}: epsilon must be >= 0, got {epsilon}")
    n = pop.size
    work = per_model_chunk(chunk, n)  # each chunk holds N fp32 task vectors and their masks
    for e in prefetched(pop, base):
        if e.numel == 0:
            continue
        dst = out.view(e).view(-1)
        lambdas = [1.0] * n
        if plus:
            shared = torch.zeros(n, dtype=torch.int64, device=dst.device)
            unique = torch.zeros(n, dtype=torch.int64, device=dst.device)
            for lo, hi in iter_chunks(e.numel, work):
                nz, count = _changed(_task_vectors(pop, base, e, lo, hi, dst.device)[1], epsilon)
                one, many = count == 1, count > 1
                for k, m in enumerate(nz):
                    shared[k] += (m & many).sum()
                    unique[k] += (m & one).sum()
            lambdas = ramplus_lambdas(shared.cpu(), unique.cpu(), r, alpha, epsilon)
        for lo, hi in iter_chunks(e.numel, work):
            base_f, taus = _task_vectors(pop, base, e, lo, hi, dst.device)
            nz, count = _changed(taus, epsilon)
            one = count == 1
            divisor = count.clamp(min=1)
            y = None
            for k, (tau, m) in enumerate(zip(taus, nz)):
                alone = tau * torch.tensor(lambdas[k], dtype=torch.float32, device=dst.device) if plus else tau
                term = torch.where(m, torch.where(one, alone, tau / divisor), 0.0)
                y = term if y is None else y + term
            dst[lo:hi] = base_f + y  # one rounding to the arena's dtype
    return out


def _merge(plus: bool):
    def merge(pop: Population, out: Arena, ctx: MergeContext) -> Arena:
        s = ctx.settings
        return ram(
            pop,
            ctx.base,
            out,
            s["ram_epsilon"],
            plus,
            s.get("r", 0.1),
            s.get("ramplus_alpha", 0.2),
            ctx.chunk,
            ctx.backend,
        )

    return merge


register(
    MergeMethod(
        writes_views=True,
        name="ram",
        params=(RAM_EPSILON,),
        needs_base=True,
        merge=_merge(False),
        min_models=1,
        uses_weights=False,
        summary="RAM: each element changed (above `ram_epsilon`) by one model takes its change, by several the mean of "
        "their changes",
    )
)
register(
    MergeMethod(
        writes_views=True,
        name="ramplus_tl",
        params=(RAM_EPSILON, R, RAMPLUS_ALPHA),
        needs_base=True,
        merge=_merge(True),
        min_models=1,
        uses_weights=False,
        summary="RAM+ (tensor-local): RAM with each model's unique changes scaled by 1 + `r` clamp(shared / unique, 0, "
        "`ramplus_alpha`), its counts per tensor",
    )
)

__all__ = ["ram", "ramplus_lambdas"]
