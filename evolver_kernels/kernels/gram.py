"""The Gram matrix of task vectors over a chunk (model_stock's and the spherical methods' angles): G[i, j] +=
<v_i, v_j>, v_k = x_k - base (x_k without a base), each product formed in fp32 and the sums in fp64; and sce's
squares, the diagonal over the elements its variance selection keeps (the fused merge's selection). The CPU
extension's kernel (csrc/cpu/gram_cpu.cpp) reads the N models and the base once and forms no task vector and no
product tensor; elsewhere (GPUs, an installation without the extension) torch forms them, N (N + 1) / 2 products
of a chunk each. The sums agree to fp64 rounding (the order of the additions differs)."""

from __future__ import annotations

import torch

from evolver_kernels.kernels.histogram import native_magnitudes
from evolver_kernels.kernels.variance import task_vector_variance


def add_task_vector_gram(out: torch.Tensor, xs: list[torch.Tensor], base: torch.Tensor | None) -> None:
    """out (float64 [N, N], on the inputs' device) += the Gram matrix of xs[k] - base over their elements; `xs` of
    one dtype and size, `base` of theirs or None."""
    n = len(xs)
    if out.shape != (n, n) or out.dtype != torch.float64:
        raise ValueError(f"out must be a float64 tensor of shape [{n}, {n}], got {list(out.shape)} {out.dtype}")
    flat = [x.contiguous().view(-1) for x in xs]
    flat_base = None if base is None else base.contiguous().view(-1)
    if all(x.dtype == flat[0].dtype for x in flat) and native_magnitudes(flat[0], flat_base) and out.is_contiguous():
        torch.ops.evolver_kernels.task_vector_gram_(flat, flat_base, out)
        return
    vs = [x.float() - flat_base.float() if flat_base is not None else x.float() for x in flat]
    for i in range(n):
        for j in range(i, n):
            s = (vs[i] * vs[j]).sum(dtype=torch.float64)
            out[i, j] += s
            if j != i:
                out[j, i] += s


def add_task_vector_squares(
    out: torch.Tensor, xs: list[torch.Tensor], base: torch.Tensor | None, select: float | None = None
) -> None:
    """out (float64 [N]) += sum_e v_k[e]^2 over the elements e whose variance over the models
    (kernels/variance.py) is at least `select` (every element when None): sce's mean squares, the variance
    formed bit for bit as the fused merge's `select` forms it."""
    n = len(xs)
    if out.shape != (n,) or out.dtype != torch.float64:
        raise ValueError(f"out must be a float64 tensor of shape [{n}], got {list(out.shape)} {out.dtype}")
    flat = [x.contiguous().view(-1) for x in xs]
    flat_base = None if base is None else base.contiguous().view(-1)
    if all(x.dtype == flat[0].dtype for x in flat) and native_magnitudes(flat[0], flat_base) and out.is_contiguous():
        torch.ops.evolver_kernels.task_vector_squares_(flat, flat_base, select, out)
        return
    taus = [x.float() - flat_base.float() if flat_base is not None else x.float() for x in flat]
    if select is not None:
        keep = task_vector_variance(taus, None) >= select
        taus = [torch.where(keep, tau, 0.0) for tau in taus]
    for k, tau in enumerate(taus):
        out[k] += (tau * tau).sum(dtype=torch.float64)
