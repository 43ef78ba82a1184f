"""Streaming merge methods over a population's arenas: never a stack of N tensors, never a model-sized
temporary. Sums run in fp32 in slot order with one rounding to the arena's dtype.

  average            out = sum_k w_k x_k / sum_k w_k        (simple average: w_k = 1; model soup)
  task_arithmetic    out = base + scale * sum_k w_k tau_k,   tau_k = x_k - base
  ties               trim each tau_k to its top `density` fraction by magnitude (per tensor), elect the sign
                     of sum_k w_k tau_k, average the weighted values that agree with it (Yadav et al. 2023)
  DARE (drop_p > 0)  before either of the last two: drop each element of tau_k with probability p and scale
                     the survivors by 1 / (1 - p) (Yu et al. 2024)

Differences from peft's merge_utils (the usual reference), by design: DARE's drops come from the package's
Philox contract (stream STREAM_DARE + k for model k, the element's global arena index as counter), so they
are reproducible on every backend and never stored as a mask tensor; TIES keeps every element whose
magnitude reaches the k-th largest (k = int(density * numel), as peft), so with tied magnitudes it may keep
a few more than k where torch.topk would pick among them arbitrarily. average and task_arithmetic stream
in chunks; ties works tensor by tensor (the trim threshold is a per-tensor k-th value: memory O(largest
tensor), not O(model)).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .arena import Arena, Entry, iter_chunks
from .population import Population
from .reference import crossover_mask_reference
from .rng import STREAM_DARE


def _check_weights(weights: list[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"weights: {len(weights)} given for {n} models")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    return [float(w) for w in weights]


def mean_into(dst: torch.Tensor, parts: Iterable[torch.Tensor], weights: list[float], acc: torch.Tensor) -> torch.Tensor:
    """dst = sum_k weights[k] * parts[k] / sum(weights): fp32 accumulation in `acc` (a chunk buffer), parts
    consumed one at a time in order (a generator may produce each just in time), one rounding to dst."""
    acc.zero_()
    for part, w in zip(parts, weights):
        if w:
            acc.add_(part, alpha=w)
    return dst.copy_(acc.div_(sum(weights)))


def average(pop: Population, out: Arena, weights: list[float] | None = None, chunk: int = 1 << 22) -> Arena:
    """out = the weighted average of the population (uniform by default)."""
    w = _check_weights(weights, pop.size)
    for group, (_, size) in pop.layout.groups.items():
        dst = out.buffers[group]
        acc = torch.empty(min(chunk, size), dtype=torch.float32, device=dst.device)
        for lo, hi in iter_chunks(size, chunk):
            parts = (pop.read(k, group, lo, hi).to(dst.device) for k in range(pop.size))
            mean_into(dst[lo:hi], parts, w, acc[: hi - lo])
    return out


def _check_base(pop: Population, base: Arena | None, method: str) -> Arena:
    if base is None:
        raise ValueError(f"{method} needs a base model (the common ancestor of the merged models)")
    if base.layout.fingerprint() != pop.layout.fingerprint():
        raise ValueError("base: its parameters differ from the population's")
    return base


def _check_p(drop_p: float) -> float:
    if not 0.0 <= drop_p < 1.0:
        raise ValueError(f"drop_p must be in [0, 1), got {drop_p}")
    return float(drop_p)


def _task_vector(pop: Population, k: int, group: str, lo: int, hi: int, b: torch.Tensor, drop_p: float, seed: int) -> torch.Tensor:
    """tau_k on elements [lo, hi) of `group`, with DARE's drop and rescale when drop_p > 0."""
    tau = pop.read(k, group, lo, hi).to(b.device).float() - b
    if drop_p > 0:
        dropped = crossover_mask_reference(hi - lo, CR=drop_p, seed=seed, stream=STREAM_DARE + k,
                                           offset=pop.layout.groups[group][0] + lo, device=b.device)
        tau = tau.masked_fill_(dropped, 0.0).div_(1.0 - drop_p)
    return tau


def task_arithmetic(pop: Population, base: Arena, out: Arena, scale: float, weights: list[float] | None = None,
                    drop_p: float = 0.0, seed: int = 0, chunk: int = 1 << 22) -> Arena:
    """out = base + scale * sum_k w_k tau_k (Ilharco et al., task vectors); drop_p > 0 makes it DARE."""
    base = _check_base(pop, base, "task arithmetic")
    w = _check_weights(weights, pop.size)
    drop_p = _check_p(drop_p)
    for group, (_, size) in pop.layout.groups.items():
        for lo, hi in iter_chunks(size, chunk):
            b = base.buffers[group][lo:hi].float()
            acc = torch.zeros_like(b)
            for k in range(pop.size):
                acc.add_(_task_vector(pop, k, group, lo, hi, b, drop_p, seed), alpha=w[k])
            out.buffers[group][lo:hi].copy_(acc.mul_(scale).add_(b))  # b may be base's own storage: never write it
    return out


def ties(pop: Population, base: Arena, out: Arena, density: float, scale: float = 1.0,
         weights: list[float] | None = None, drop_p: float = 0.0, seed: int = 0) -> Arena:
    """TIES-merging (trim, elect sign, disjoint mean), optionally on DARE-dropped task vectors."""
    base = _check_base(pop, base, "TIES")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    w = _check_weights(weights, pop.size)
    drop_p = _check_p(drop_p)
    for e in pop.layout.entries:
        _ties_tensor(pop, base, out, e, density, scale, w, drop_p, seed)
    return out


def _ties_tensor(pop, base, out, e: Entry, density, scale, w, drop_p, seed) -> None:
    """One tensor: two passes over the models (thresholds and elected sign, then the disjoint mean), so
    memory stays a few tensor-sized fp32 buffers whatever N is."""
    lo, hi = e.offset, e.offset + e.numel
    b = base.buffers[e.group][lo:hi].float()
    keep = int(density * e.numel)

    def trimmed(k: int, threshold):
        tau = _task_vector(pop, k, e.group, lo, hi, b, drop_p, seed)
        if keep == 0:
            return tau.zero_(), threshold
        if keep < e.numel:
            if threshold is None:
                threshold = tau.abs().kthvalue(e.numel - keep + 1).values
            tau.masked_fill_(tau.abs() < threshold, 0.0)
        return tau.mul_(w[k]), threshold

    thresholds, sign = [], torch.zeros_like(b)
    for k in range(pop.size):
        tau, threshold = trimmed(k, None)
        thresholds.append(threshold)
        sign.add_(tau)
    sign.sign_()
    total, count = torch.zeros_like(b), torch.zeros_like(b)
    for k in range(pop.size):
        tau, _ = trimmed(k, thresholds[k])
        agree = (tau.sign() == sign) & (tau != 0)
        total.add_(tau.masked_fill_(~agree, 0.0))
        count.add_(agree)
    out.buffers[e.group][lo:hi].copy_(total.div_(count.clamp_(min=1)).mul_(scale).add_(b))


METHODS = ("average", "task_arithmetic", "ties", "dare_linear", "dare_ties")


class Merger:
    """A merge method with its settings, checked once; `merger(pop, out)` merges any Population-like reader
    (the driver passes a view of the population with offspring in some slots)."""

    def __init__(self, method: str = "average", base: Arena | None = None, scale: float = 1.0, density: float = 0.5,
                 drop_p: float = 0.5, seed: int = 0, weights: list[float] | None = None):
        if method not in METHODS:
            raise ValueError(f"merge method must be one of {', '.join(METHODS)}, got {method!r}")
        if method != "average" and base is None:
            raise ValueError(f"{method} needs a base model (the common ancestor of the merged models)")
        if method in ("ties", "dare_ties") and not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        self.method, self.base, self.scale, self.density, self.seed, self.weights = method, base, scale, density, seed, weights
        self.drop_p = _check_p(drop_p) if method.startswith("dare") else 0.0

    def describe(self) -> str:
        if self.method == "average":
            return "simple average"
        extra = f", density {self.density}" if "ties" in self.method else ""
        extra += f", drop p {self.drop_p}" if self.drop_p else ""
        return f"{self.method} (scale {self.scale}{extra})"

    def __call__(self, pop: Population, out: Arena, chunk: int = 1 << 22) -> Arena:
        if self.method == "average":
            return average(pop, out, self.weights, chunk)
        if self.method in ("task_arithmetic", "dare_linear"):
            return task_arithmetic(pop, self.base, out, self.scale, self.weights, self.drop_p, self.seed, chunk)
        return ties(pop, self.base, out, self.density, self.scale, self.weights, self.drop_p, self.seed)
