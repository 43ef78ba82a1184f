"""Merge methods over a population's arenas, streamed chunk by chunk through the fused operator
evolver_kernels.merge_tensors: each chunk of every model is read once and the merged chunk written once; never
a stack of N tensors, never a mask tensor, never a model-sized temporary. Exact arithmetic:
evolver_kernels.reference.merge_reference.

  average            out = sum_k w_k x_k / sum_k w_k        (simple average: w_k = 1; model soup)
  fisher             out = sum_k w_k F_k x_k / sum_k w_k F_k (F_k: model k's diagonal Fisher, merge_stats.py)
  task_arithmetic    out = base + scale * sum_k w_k tau_k,   tau_k = x_k - base
  ties               trim each tau_k to its top `density` fraction by magnitude (per tensor), elect the sign
                     of sum_k w_k tau_k, weighted mean of the values that agree with it (Yadav et al. 2023)
  dare_linear/_ties  the last two on tau_k with each element dropped with probability p and the survivors
                     scaled by 1 / (1 - p) (Yu et al. 2024)
  regmean            linear layers: W = (sum_k G_k)^-1 sum_k G_k W_k with G_k the Gram matrix of the layer's
                     inputs (off-diagonal entries times alpha); every other tensor: the average (regmean.py)

Where ours differs from mergekit's generalized task arithmetic and peft's merge_utils, and why:
- DARE's drops come from the package's Philox contract (stream STREAM_DARE + k for model k, the element's
  global arena index as counter), so they are reproducible on every backend and never stored; survivors are
  scaled by 1 / (1 - p) as in the paper (mergekit's `rescale` keeps the L1 norm instead).
- TIES keeps every element whose magnitude reaches the k-th largest, k = max(1, int(density * numel)) as in
  mergekit, found exactly by a two-pass radix histogram over chunks (memory O(chunk), not O(tensor)); where
  magnitudes tie at the threshold it keeps them all, where mergekit's argsort picks among them arbitrarily.
  The elected sign is + where the weighted sum is >= 0 (mergekit; peft gives sign 0 there) and the mean
  divides by the weights of the agreeing models (mergekit's normalize; peft divides by their count, the same
  for unit weights).
- Sums run in fp32 in slot order with one rounding to the arena's dtype (mergekit sums in the model dtype).
"""

from __future__ import annotations

import torch

from .arena import Arena, iter_chunks
from .ops import MAX_MERGE_INPUTS, crossover_mask, merge_tensors
from .population import Population
from .rng import STREAM_DARE

METHODS = ("average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "fisher", "regmean")
NEEDS_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties")


def _check_weights(weights: list[float] | None, n: int) -> list[float]:
    if n > MAX_MERGE_INPUTS:
        raise ValueError(f"a merge takes at most {MAX_MERGE_INPUTS} models, got {n}")
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"weights: {len(weights)} given for {n} models")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    return [float(w) for w in weights]


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


def _check_density(density: float | list[float], n: int | None = None) -> float | list[float]:
    """One density, or one per model (mergekit's per-model `density`), each in (0, 1]."""
    if isinstance(density, (list, tuple)):
        if n is not None and len(density) != n:
            raise ValueError(f"density: {len(density)} given for {n} models")
        return [_check_density(d) for d in density]
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return float(density)


def _read_all(pop: Population, group: str, lo: int, hi: int, device: torch.device) -> list[torch.Tensor]:
    return [pop.read(k, group, lo, hi).to(device, non_blocking=True) for k in range(pop.size)]


def _merge_linear(pop: Population, out: Arena, chunk: int, backend: str | None, *, base: Arena | None = None,
                  fisher=None, **kw) -> Arena:
    """Every group in chunks that may span tensors: the linear modes have no per-tensor state."""
    for group, (start, size) in pop.layout.groups.items():
        staged = getattr(pop, "chunks", None)  # a pipeline's view stages the reads of the next chunk (staging.py)
        if out.is_placed or staged is None:
            spans = out.chunks(group, chunk)  # placed: each chunk merged on the device that holds it
        else:
            spans = ((lo, hi, out.buffers[group][lo:hi]) for lo, hi in staged(group, size, chunk))
        for lo, hi, dst in spans:
            b = _base_chunk(base, group, lo, hi, dst.device) if base is not None else None
            f = [fisher.read(k, group, lo, hi).to(dst.device) for k in range(pop.size)] if fisher is not None else None
            merge_tensors(_read_all(pop, group, lo, hi, dst.device), base=b, fisher=f, offset=start + lo,
                          out=dst, backend=backend, stream=STREAM_DARE, **kw)
    return out


def _base_chunk(base: Arena, group: str, lo: int, hi: int, device: torch.device) -> torch.Tensor:
    """Elements [lo, hi) of the base model's group (they may span its segments if it is placed)."""
    parts = [t[max(lo, s_lo) - s_lo : min(hi, s_hi) - s_lo] for s_lo, s_hi, t in base.segments(group)
             if s_lo < hi and lo < s_hi]
    return parts[0].to(device) if len(parts) == 1 else torch.cat([p.to(device) for p in parts])


def average(pop: Population, out: Arena, weights: list[float] | None = None, chunk: int = 1 << 22,
            backend: str | None = None, fisher=None) -> Arena:
    """out = the weighted average of the population (uniform by default); with `fisher` (merge_stats.FisherStats)
    each element weighted by its model's Fisher as well."""
    return _merge_linear(pop, out, chunk, backend, fisher=fisher, weights=_check_weights(weights, pop.size))


def task_arithmetic(pop: Population, base: Arena, out: Arena, scale: float, weights: list[float] | None = None,
                    drop_p: float = 0.0, seed: int = 0, chunk: int = 1 << 22, backend: str | None = None) -> Arena:
    """out = base + scale * sum_k w_k tau_k (Ilharco et al., task vectors); drop_p > 0 makes it DARE."""
    base = _check_base(pop, base, "task arithmetic")
    return _merge_linear(pop, out, chunk, backend, base=base, weights=_check_weights(weights, pop.size),
                         scale=scale, normalize=False, drop_p=_check_p(drop_p), seed=seed)


def ties(pop: Population, base: Arena, out: Arena, density: float | list[float], scale: float = 1.0,
         weights: list[float] | None = None, drop_p: float = 0.0, seed: int = 0, chunk: int = 1 << 22,
         backend: str | None = None) -> Arena:
    """TIES-merging (trim, elect sign, disjoint mean), optionally on DARE-dropped task vectors. Tensor by
    tensor: the trim threshold is each tensor's own (found in two streaming passes), then one fused pass.
    `density` is one fraction for every model or one per model."""
    base = _check_base(pop, base, "TIES")
    density = _check_density(density, pop.size)
    densities = density if isinstance(density, list) else [density] * pop.size
    w = _check_weights(weights, pop.size)
    drop_p = _check_p(drop_p)
    for e in pop.layout.entries:
        start = pop.layout.groups[e.group][0]
        dst = out.view(e).view(-1)  # the entry's elements, on the device that holds them
        lo_e, hi_e = e.offset, e.offset + e.numel
        trims = [0.0] * pop.size
        for k in range(pop.size):
            keep = max(1, int(densities[k] * e.numel))
            if keep < e.numel:
                def task_vector(lo, hi, k=k):
                    return _task_vector(pop, base, k, e.group, lo, hi, start, drop_p, seed, dst.device, backend)
                trims[k] = kth_largest_magnitude(task_vector, lo_e, hi_e, keep, chunk)
        for lo, hi in iter_chunks(e.numel, chunk):
            merge_tensors(_read_all(pop, e.group, lo_e + lo, lo_e + hi, dst.device),
                          base=_base_chunk(base, e.group, lo_e + lo, lo_e + hi, dst.device), weights=w, trim=trims,
                          scale=scale, normalize=True, drop_p=drop_p, seed=seed, stream=STREAM_DARE,
                          offset=start + lo_e + lo, out=dst[lo:hi], backend=backend)
    return out


def _task_vector(pop, base, k, group, lo, hi, start, drop_p, seed, device, backend) -> torch.Tensor:
    """tau_k on [lo, hi) of `group` in fp32, exactly as the fused merge computes it before trimming."""
    tau = pop.read(k, group, lo, hi).to(device).float() - _base_chunk(base, group, lo, hi, device).float()
    if drop_p > 0:
        dropped = crossover_mask(hi - lo, CR=drop_p, seed=seed, stream=STREAM_DARE + k, offset=start + lo,
                                 device=device, backend=backend)
        rescale = torch.tensor(1.0 / (1.0 - drop_p), dtype=torch.float32, device=device)
        tau = torch.where(dropped, torch.zeros((), device=device), tau * rescale)
    return tau


def kth_largest_magnitude(values, lo: int, hi: int, k: int, chunk: int = 1 << 22) -> float:
    """The k-th largest |v| over v = values(a, b) for chunks [a, b) of [lo, hi), exactly (the value
    torch.kthvalue(|v|, n - k + 1) gives), in two histogram passes over the fp32 bit patterns (non-negative
    floats order as their bits): the top 16 bits, then the low 16 bits within the chosen bucket."""
    if not 1 <= k <= hi - lo:
        raise ValueError(f"k must be in [1, {hi - lo}], got {k}")

    def histogram(select_high: int | None) -> torch.Tensor:
        counts = None
        for a, b in iter_chunks(hi - lo, chunk):
            bits = values(lo + a, lo + b).abs().view(torch.int32)  # counted where the values are (GPU or CPU)
            if counts is None:
                counts = torch.zeros(1 << 16, dtype=torch.int64, device=bits.device)
            if select_high is None:
                counts += torch.bincount(bits >> 16, minlength=1 << 16)
            else:
                counts += torch.bincount(bits[(bits >> 16) == select_high] & 0xFFFF, minlength=1 << 16)
        return counts.cpu()

    def bucket_of_kth(counts: torch.Tensor, k: int) -> tuple[int, int]:
        """(bucket holding the k-th largest, how many lie in higher buckets)."""
        from_top = counts.flip(0).cumsum(0)
        idx = int(torch.searchsorted(from_top, k))
        return (1 << 16) - 1 - idx, int(from_top[idx - 1]) if idx > 0 else 0

    high, above = bucket_of_kth(histogram(None), k)
    low, _ = bucket_of_kth(histogram(high), k - above)
    return float(torch.tensor((high << 16) | low, dtype=torch.int32).view(torch.float32))


class Merger:
    """A merge method with its settings, checked once; `merger(pop, out)` merges any Population-like reader
    (the driver passes a view of the population with offspring in some slots).

    fisher (merge_stats.FisherStats) is needed by "fisher", regmean (regmean.RegMean) by "regmean"; both hold
    statistics of the original individuals, and an offspring inherits its slot's."""

    def __init__(self, method: str = "average", base: Arena | None = None, scale: float = 1.0, density: float = 0.5,
                 drop_p: float = 0.5, seed: int = 0, weights: list[float] | None = None, backend: str | None = None,
                 fisher=None, regmean=None):
        if method not in METHODS:
            raise ValueError(f"merge method must be one of {', '.join(METHODS)}, got {method!r}")
        if method in NEEDS_BASE and base is None:
            raise ValueError(f"{method} needs a base model (the common ancestor of the merged models)")
        if method in ("ties", "dare_ties"):
            _check_density(density)
        if method == "fisher" and fisher is None:
            raise ValueError("fisher needs the models' Fisher information (merge_stats.estimate_fisher)")
        if method == "regmean" and regmean is None:
            raise ValueError("regmean needs the models' Gram matrices (regmean.RegMean)")
        self.method, self.base, self.scale, self.density, self.seed, self.weights = method, base, scale, density, seed, weights
        self.drop_p = _check_p(drop_p) if method.startswith("dare") else 0.0
        self.backend, self.fisher, self.regmean = backend, fisher, regmean

    def describe(self) -> str:
        if self.method in ("average", "fisher", "regmean"):
            return {"average": "simple average", "fisher": "Fisher-weighted average",
                    "regmean": f"RegMean (alpha {self.regmean.alpha})" if self.regmean else "RegMean"}[self.method]
        extra = f", density {self.density}" if "ties" in self.method else ""
        extra += f", drop p {self.drop_p}" if self.drop_p else ""
        return f"{self.method} (scale {self.scale}{extra})"

    def changed(self, i: int) -> None:
        """Individual i of the population was replaced (cached per-individual terms are stale)."""
        if self.regmean is not None:
            self.regmean.changed(i)

    def __call__(self, pop: Population, out: Arena, chunk: int = 1 << 22) -> Arena:
        kw = {"chunk": chunk, "backend": self.backend}
        if self.method == "average":
            return average(pop, out, self.weights, **kw)
        if self.method == "fisher":
            return average(pop, out, self.weights, fisher=self.fisher, **kw)
        if self.method == "regmean":
            average(pop, out, self.weights, **kw)
            return self.regmean.merge_into(pop, out)
        if self.method in ("task_arithmetic", "dare_linear"):
            return task_arithmetic(pop, self.base, out, self.scale, self.weights, self.drop_p, self.seed, **kw)
        return ties(pop, self.base, out, self.density, self.scale, self.weights, self.drop_p, self.seed, **kw)
