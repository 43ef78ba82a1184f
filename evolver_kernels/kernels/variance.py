"""sce's selection statistic: the population variance over the models of their task vectors, per element, in fp32,
exactly as the fused merge forms it before selecting (reference.variance_reference: the mean first, then the mean
of the squared deviations, sums in slot order). The CPU extension's kernel (csrc/cpu/select_cpu.cpp) reads the N
models and the base once and writes only the variance; elsewhere torch forms the N task vectors first. Both give
the same bits (tests/kernels/test_variance.py)."""

from __future__ import annotations

import torch

from evolver_kernels.kernels.histogram import native_magnitudes
from evolver_kernels.kernels.reference import variance_reference


def task_vector_variance(xs: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    """fp32 [numel]: the variance over k of xs[k] - base (xs[k] without a base), element by element; `xs` of one
    dtype and size, `base` of theirs."""
    flat = [x.contiguous().view(-1) for x in xs]
    flat_base = None if base is None else base.contiguous().view(-1)
    if all(x.dtype == flat[0].dtype for x in flat) and native_magnitudes(flat[0], flat_base):
        out = torch.empty(flat[0].numel(), dtype=torch.float32, device=flat[0].device)
        torch.ops.evolver_kernels.task_vector_variance_(flat, flat_base, out)
        return out
    base_f = None if flat_base is None else flat_base.float()
    return variance_reference([x.float() - base_f if base_f is not None else x.float() for x in flat])
