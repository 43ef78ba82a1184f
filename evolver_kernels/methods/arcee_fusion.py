"""Arcee Fusion with mergekit 0.1.5's semantics: one model x merged into the base b, taking the model's value only
where it changed the base most, judged per tensor:

  d = x - b;  kl(row) = sum_j p_j log(p_j / q_j),  p = softmax(x_row) + 1e-8,  q = softmax(b_row) + 1e-8
  importance(j) = |d(j)| kl(row of j)            (softmax and sum over the last dimension: one kl per row; a
                                                  vector is one row)
  threshold = Q(0.5) + 1.5 (Q(0.75) - Q(0.25)),  Q(q) = the importances sorted ascending, at index
              floor(q (n - 1)) (n the tensor's elements; no interpolation)
  out = b + d * [importance >= threshold]

(mergekit's arcee_fusion: its `base_model` is b, the one other model x; no parameters.)

Streaming, per tensor: spans of whole rows (the softmax is row-wise; a row longer than the chunk is still read
whole, so memory is O(max(chunk, row length))); never a mask tensor of a tensor or of the model. A tensor that
is one span (at most one chunk, or a single row) is read once: its importances counted in the two histogram
passes below (no sort), thresholded and merged. A larger one takes three passes over its spans: (1) kl of each
row, kept as one fp32 per row (a [rows] vector, 1 / row length of the tensor), and the histogram of the top 16 bits of each importance's order-preserving fp32
key; (2) the histogram of the low 16 bits within the buckets that hold the three order statistics, which gives
them exactly (kth_smallest: TIES' radix selection extended to signed values, since kl, and so an importance,
can round below 0); (3) the element-wise merge. Each pass recomputes the importances of a span from b, x and
the kept kl with the same fp32 ops, so the three see the same bits. Not a fused kernel: plain fp32 torch on the
span, on the device that holds the output, one rounding to the arena's dtype.

Where ours differs from mergekit, on purpose:
- Quantiles: exact over the whole tensor, whatever its size. mergekit sorts the whole tensor's importances only
  up to 1,000,000 elements; above that it samples 1,000,000 of them with replacement (torch.randint from torch's
  global generator) and takes the order statistics of the sample, so its threshold (and the merge) of a large
  tensor changes from run to run. Ours, for every n, takes the elements of ascending rank floor((n - 1) / 4),
  floor((n - 1) / 2) and floor(3 (n - 1) / 4) (0-based) of all n importances; up to 1,000,000 elements these are
  exactly mergekit's indices (its fp32 q (n - 1) is exact there), and the threshold is formed with mergekit's
  fp32 ops.
- Inputs in bfloat16 / float16 are computed in fp32 and rounded once (mergekit computes softmax, kl, the
  importances and the threshold in the inputs' dtype). On float32 inputs the expressions are mergekit's
  (tests/test_mergekit_ram_fusion.py: the same tensors to fp32 rounding).
- Per-model weights are refused (mergekit's arcee_fusion has none). Both models must have every tensor (the
  package merges models of one layout; mergekit passes a tensor only one of them has through).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from evolver_kernels.kernels.histogram import BUCKETS, count_into
from evolver_kernels.methods.registry import MergeContext, MergeMethod, register
from evolver_kernels.methods.streaming import Base, base_chunk, check_base, prefetched
from evolver_kernels.storage.arena import Arena, Entry
from evolver_kernels.storage.population import Population

KL_EPS = 1e-8  # mergekit's eps added to both softmaxes
QUANTILES = (0.25, 0.5, 0.75)
IQR_FACTOR = 1.5


def quantile_ranks(n: int) -> list[int]:
    """The 0-based ascending ranks of Q(0.25), Q(0.5), Q(0.75) among n values: floor(q (n - 1)), in integers."""
    return [(n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4]


def _keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys whose signed order is the fp32 values' order (-0.0 just below +0.0; NaN outside)."""
    bits = values.contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _value_of_key(key: int) -> float:
    """The fp32 value of a key (the map is its own inverse on the bits)."""
    bits = key ^ (0x7FFFFFFF if key < 0 else 0)
    return float(torch.tensor(bits, dtype=torch.int32).view(torch.float32))


def _bucket(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(the bucket holding the k-th smallest (1-based), how many lie in lower buckets)."""
    below = counts.cumsum(0)
    idx = int(torch.searchsorted(below, k))
    return idx, int(below[idx - 1]) if idx > 0 else 0


def kth_smallest(
    values: Callable[[int, int], torch.Tensor], spans: list[tuple[int, int]], ks: list[int]
) -> list[float]:
    """The k-th smallest (1-based) of the fp32 values(lo, hi) over all spans, for each k, exactly: two passes of
    radix histograms over order-preserving keys (the top 16 bits, then the low 16 bits within the buckets that
    hold a k); O(2^16) counts, never the values of more than one span at once."""
    n = sum(hi - lo for lo, hi in spans)
    if any(not 1 <= k <= n for k in ks):
        raise ValueError(f"k must be in [1, {n}], got {ks}")
    half = BUCKETS >> 1
    top = None
    for lo, hi in spans:
        keys = _keys(values(lo, hi)).view(-1)
        if top is None:
            top = torch.zeros(BUCKETS, dtype=torch.int64, device=keys.device)
        count_into(top, ((keys >> 16) + half).long())
    counted = top.cpu()
    found = [_bucket(counted, k) for k in ks]
    highs = sorted({high for high, _ in found})
    slot = torch.full((BUCKETS,), -1, dtype=torch.int64, device=top.device)
    slot[highs] = torch.arange(len(highs), device=top.device)
    lows = torch.zeros(len(highs) * BUCKETS, dtype=torch.int64, device=top.device)
    for lo, hi in spans:  # the low 16 bits of the keys in the selected buckets, one histogram per bucket
        keys = _keys(values(lo, hi)).view(-1)
        s = slot[((keys >> 16) + half).long()]
        selected = s >= 0
        count_into(lows, s[selected] * BUCKETS + (keys[selected] & 0xFFFF).long())
    lows = lows.view(len(highs), BUCKETS).cpu()
    out = []
    for k, (high, below) in zip(ks, found):
        low, _ = _bucket(lows[highs.index(high)], k - below)
        out.append(_value_of_key(((high - half) << 16) | low))
    return out


def row_kl(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """kl of each row of x [R, C] against b [R, C] (mergekit's _compute_importance), fp32: [R]."""
    p = F.softmax(x, dim=-1) + KL_EPS
    q = F.softmax(b, dim=-1) + KL_EPS
    return torch.sum(p * torch.log(p / q), dim=-1)


def fusion_threshold(q1: float, median: float, q3: float) -> torch.Tensor:
    """median + 1.5 (q3 - q1) with mergekit's fp32 ops (a 0-d fp32 tensor)."""
    q = torch.tensor([q1, median, q3], dtype=torch.float32)
    return q[1] + IQR_FACTOR * (q[2] - q[0])


def arcee_fusion(pop: Population, base: Base, out: Arena, chunk: int = 1 << 22, backend: str | None = None) -> Arena:
    """Arcee Fusion of the population's one model into the base, tensor by tensor, on spans of whole rows."""
    base = check_base(pop, base, "arcee_fusion")
    if pop.size != 1:
        raise ValueError(f"arcee_fusion merges exactly one model into the base, got {pop.size}")
    for e in prefetched(pop, base):
        if e.numel == 0:
            continue
        _merge_entry(pop, base, out, e, chunk)
    return out


def _merge_entry(pop: Population, base: Base, out: Arena, e: Entry, chunk: int) -> None:
    dst = out.view(e).view(-1)
    device = dst.device
    cols = e.shape[-1] if e.shape else 1
    rows = e.numel // cols
    per = max(1, chunk // cols)
    spans = [(r0 * cols, min(rows, r0 + per) * cols) for r0 in range(0, rows, per)]

    def read(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, x) of elements [lo, hi) (whole rows) as [rows, cols] fp32."""
        a, z = e.offset + lo, e.offset + hi
        b = base_chunk(base, e.group, a, z, device).float().view(-1, cols)
        return b, pop.read(0, e.group, a, z).to(device).float().view(-1, cols)

    ranks = quantile_ranks(e.numel)
    if len(spans) == 1:  # one read, both histogram passes over it
        b, x = read(0, e.numel)
        importance = (x - b).abs() * row_kl(x, b).unsqueeze(-1)
        flat = importance.view(-1)
        threshold = fusion_threshold(*kth_smallest(lambda lo, hi: flat[lo:hi], spans, [i + 1 for i in ranks]))
        dst.copy_((b + (x - b) * (importance >= threshold.to(device))).view(-1))
        return
    kl = torch.empty(rows, dtype=torch.float32, device=device)
    known = [0]  # rows whose kl is computed (the first pass fills kl span by span)

    def importance_of(lo: int, hi: int, b: torch.Tensor | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
        if b is None:
            b, x = read(lo, hi)
        r0, r1 = lo // cols, hi // cols
        if r1 > known[0]:
            kl[r0:r1] = row_kl(x, b)
            known[0] = r1
        return (x - b).abs() * kl[r0:r1].unsqueeze(-1)

    threshold = fusion_threshold(*kth_smallest(importance_of, spans, [i + 1 for i in ranks])).to(device)
    for lo, hi in spans:
        b, x = read(lo, hi)
        keep = importance_of(lo, hi, b, x) >= threshold
        dst[lo:hi] = (b + (x - b) * keep).view(-1)


def _arcee_fusion(pop: Population, out: Arena, ctx: MergeContext) -> Arena:
    return arcee_fusion(pop, ctx.base, out, ctx.chunk, ctx.backend)


register(
    MergeMethod(
        writes_views=True,
        name="arcee_fusion",
        needs_base=True,
        merge=_arcee_fusion,
        min_models=1,
        max_models=1,
        uses_weights=False,
        evolve_refusal="it merges one model into the base, and a population merge takes every individual",
        summary="the base, taking the model's change where its importance abs(x - base) KL(softmax of the row) reaches "
        "the tensor's median + 1.5 IQR of importances",
    )
)

__all__ = ["arcee_fusion", "fusion_threshold", "kth_smallest", "quantile_ranks", "row_kl"]
