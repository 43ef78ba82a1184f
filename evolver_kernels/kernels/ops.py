"""Public operators: argument checks and backend dispatch (docs/ARCHITECTURE.md §3).

Every backend implements the same contract; this module checks arguments once, with errors that name
the argument, and never copies or converts a tensor behind the caller's back.
"""

from __future__ import annotations

import torch

from evolver_kernels.kernels import backends, reference
from evolver_kernels.kernels.checks import (
    INDEX_LIMIT,
    as_int,
    check_CR,
    check_F,
    check_out_aliasing,
    check_out_disjoint,
    check_stream,
    check_tensor,
    to_int64,
)
from evolver_kernels.kernels.merge_params import MergeParams
from evolver_kernels.kernels.rng import crossover_threshold

_fake_registered = False


def _register_fakes() -> None:
    """Fake (meta) implementations so torch.compile / FakeTensor tracing can see through the ops."""
    global _fake_registered
    if _fake_registered or backends.cpu_extension() is None:
        return
    _fake_registered = True

    @torch.library.register_fake("evolver_kernels::de_mutate_crossover_")
    def _de_fake(x, a, base, b, F, threshold, seed, stream, offset, out):
        return None

    @torch.library.register_fake("evolver_kernels::crossover_mask_")
    def _mask_fake(out, threshold, seed, stream, offset):
        return None

    @torch.library.register_fake("evolver_kernels::merge_")
    def _merge_fake(*args, **kwargs):  # arguments: MergeParams.op_arguments
        return None


def de_mutate_crossover(
    x: torch.Tensor,
    base: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    F: float,
    CR: float,
    seed: int,
    stream: int = 0,
    offset: int = 0,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Fused DE mutation and binomial crossover: u_j = base_j + F * (a_j - b_j) where m_j, else x_j.

    x, base, a, b (and out): same shape, dtype (float32, bfloat16, float16) and device, contiguous.
    m_j = philox word of global index offset + j < floor(CR * 2**32) (docs/ARCHITECTURE.md §2).
    Arithmetic in fp32, one rounding; unselected elements are x's bits. `out` may be x (in place);
    passing the same tensor object as x, base and b (the evolver strategy) reads two tensors, not four.
    Returns `out` (a new tensor when None). No other allocation on the cpu, triton and cuda backends.
    """
    check_tensor("x", x, None)
    for name, t in (("base", base), ("a", a), ("b", b)):
        check_tensor(name, t, x)
    if out is not None:
        check_tensor("out", out, x)
    F = check_F(F)
    CR = check_CR(CR)
    seed, stream, offset = check_stream(seed, stream, offset, x.numel())
    name = backends.resolve_backend(backend, x.device)
    if out is None:
        out = torch.empty_like(x)
    else:
        check_out_aliasing(out, {"x": x, "base": base, "a": a, "b": b})
    threshold = crossover_threshold(CR)

    if name == "reference":
        return reference.de_mutate_crossover_reference(
            x, base, a, b, F=F, CR=CR, seed=seed, stream=stream, offset=offset, out=out
        )
    evolver_inputs = base.data_ptr() == x.data_ptr() and b.data_ptr() == x.data_ptr()
    opt_base = None if evolver_inputs else base
    opt_b = None if evolver_inputs else b
    if name == "triton":
        backends.triton_kernels().de_mutate_crossover(
            x, a, opt_base, opt_b, out, F=F, threshold=threshold, seed=seed, stream=stream, offset=offset
        )
        return out
    _register_fakes()
    torch.ops.evolver_kernels.de_mutate_crossover_(
        x, a, opt_base, opt_b, F, threshold, to_int64(seed), to_int64(stream), offset, out
    )
    return out


def crossover_mask(
    numel: int,
    *,
    CR: float,
    seed: int,
    stream: int = 0,
    offset: int = 0,
    device: torch.device | str = "cpu",
    backend: str | None = None,
) -> torch.Tensor:
    """Bool [numel]: the crossover mask of elements offset .. offset + numel - 1. For tests and debugging:
    the operators never materialise it."""
    numel = as_int("numel", numel, 0, INDEX_LIMIT)
    CR = check_CR(CR)
    seed, stream, offset = check_stream(seed, stream, offset, numel)
    device = torch.device(device)
    name = backends.resolve_backend(backend, device)
    if name == "reference":
        return reference.crossover_mask_reference(numel, CR=CR, seed=seed, stream=stream, offset=offset, device=device)
    out = torch.empty(numel, dtype=torch.bool, device=device)
    threshold = crossover_threshold(CR)
    if name == "triton":
        backends.triton_kernels().crossover_mask(out, threshold=threshold, seed=seed, stream=stream, offset=offset)
        return out
    _register_fakes()
    torch.ops.evolver_kernels.crossover_mask_(out, threshold, to_int64(seed), to_int64(stream), offset)
    return out


def available_backends(device: torch.device | str) -> list[str]:
    """Subset of ["reference", "cpu", "triton", "cuda"] that can run on `device`."""
    return backends.available_backends(device)


def merge_tensors(
    xs: list[torch.Tensor], *, out: torch.Tensor | None = None, backend: str | None = None, **options
) -> torch.Tensor:
    """Fused merge of n models' tensors in one pass: each input read once (twice for TIES on a GPU, from
    cache), the output written once, no stacking and no mask tensors.

    `options` are the fields of MergeParams (kernels/merge_params.py, where each is described and checked):
    weights, base, fisher, trim, top, elect, elect_weights, select, scale, normalize, min_den, nearswap_t, drop_p,
    drop_thresholds, drop_rescales, seed, stream, offset. Exact formula:
    evolver_kernels.kernels.reference.merge_reference. `out` may be one of the inputs; returns `out` (a new tensor
    when None). Allocates nothing else, but for the triton backend's small per-call tables (addresses, weights,
    bounds).
    """
    p = MergeParams(xs, **options)
    like = p.xs[0]
    name = backends.resolve_backend(backend, like.device)
    if out is None:
        out = torch.empty_like(like)
    else:
        check_tensor("out", out, like)
        inputs = {f"xs[{k}]": x for k, x in enumerate(p.xs)}
        if p.base is not None:
            inputs["base"] = p.base
        check_out_aliasing(out, inputs)
        check_out_disjoint(out, {f"fisher[{k}]": f for k, f in enumerate(p.fisher or [])})
    if name == "reference":
        return out.copy_(reference.merge_reference(p.xs, **p.options()))
    if name == "triton" and p.nearswap_t is not None:
        backends.triton_kernels().nearswap(p.xs[0], p.base, out, p.nearswap_t)
        return out
    if name == "triton":
        backends.triton_kernels().merge(p, out)
        return out
    _register_fakes()
    torch.ops.evolver_kernels.merge_(**p.op_arguments(out))
    return out
