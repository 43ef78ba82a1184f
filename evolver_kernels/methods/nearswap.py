"""NearSwap with mergekit 0.1.5's semantics and parameter name: one model x merged into the base b, element by
element, taking the model's value where the two are close and keeping the base's where they are far:

  weight = clamp(t / max(|b - x|, 1e-6), 0, 1);  out = weight * x + (1 - weight) * b

(mergekit's nearswap: its `base_model` is b, the one other model x; t <= 0 gives the base.) No per-tensor state:
one element-wise pass, chunk by chunk, through the fused operator (merge_tensors' nearswap mode: fp32, one
rounding to the arena's dtype, the same bits on every backend; reference.nearswap_reference).

Where ours differs from mergekit, on purpose: inputs in bfloat16 / float16 are computed in fp32 (mergekit
computes in the inputs' dtype; on float32 inputs the expressions and their bits are mergekit's); `t` defaults to
0.5, the default of the package's one `t` parameter (mergekit requires it); a per-model weight is refused
(mergekit's nearswap has none).
"""

from __future__ import annotations

from evolver_kernels.kernels.ops import merge_tensors
from evolver_kernels.methods.registry import MergeContext, MergeMethod, register
from evolver_kernels.methods.spherical import T
from evolver_kernels.methods.streaming import Base, base_chunk, check_base
from evolver_kernels.storage.arena import Arena, iter_chunks
from evolver_kernels.storage.population import Population


def nearswap(
    pop: Population, base: Base, out: Arena, t: float, chunk: int = 1 << 22, backend: str | None = None
) -> Arena:
    """NearSwap of the population's one model into the base, tensor by tensor, chunk by chunk."""
    base = check_base(pop, base, "nearswap")
    if pop.size != 1:
        raise ValueError(f"nearswap merges exactly one model into the base, got {pop.size}")
    for e in pop.layout.entries:
        dst = out.view(e).view(-1)
        for lo, hi in iter_chunks(e.numel, chunk):
            a, b = e.offset + lo, e.offset + hi
            merge_tensors(
                [pop.read(0, e.group, a, b).to(dst.device)],
                base=base_chunk(base, e.group, a, b, dst.device),
                nearswap_t=t,
                out=dst[lo:hi],
                backend=backend,
            )
    return out


def _nearswap(pop: Population, out: Arena, ctx: MergeContext) -> Arena:
    return nearswap(pop, ctx.base, out, ctx.settings["t"], ctx.chunk, ctx.backend)


register(
    MergeMethod(
        writes_views=True,
        name="nearswap",
        params=(T,),
        needs_base=True,
        merge=_nearswap,
        min_models=1,
        max_models=1,
        uses_weights=False,
        evolve_refusal="it merges one model into the base, and a population merge takes every individual",
        summary="the base, each element moved to the model's value by weight min(1, t / abs(base - x)) (close elements "
        "swapped in)",
    )
)
