"""Task-vector methods (tau_k = x_k - base): task arithmetic, TIES and DARE, streamed through the fused
operator merge_tensors, with TIES' per-tensor trim thresholds found exactly without a sort: one pass over a
window a sample narrowed (the sample select), else two radix-histogram passes, over chunks (memory O(chunk), not
O(tensor)): kth_largest_magnitudes.

  task_arithmetic    out = base + scale * sum_k w_k tau_k                      (Ilharco et al. 2023)
  ties               trim each tau_k to its top `density` fraction by magnitude (per tensor), elect the sign
                     of sum_k w_k tau_k, weighted mean of the values that agree with it (Yadav et al. 2023)
  dare_linear/_ties  the last two on tau_k with each element dropped with probability p and the survivors
                     scaled by 1 / (1 - p) (Yu et al. 2024)

Where ours differs from mergekit's generalized task arithmetic and peft's merge_utils, on purpose:
- DARE's drops come from the package's Philox contract (stream STREAM_DARE + k for model k, the element's
  global arena index as counter: docs/ARCHITECTURE.md §2), so they are reproducible on every backend and never
  stored; survivors are scaled by 1 / (1 - p) as in the paper (mergekit's `rescale` keeps the L1 norm
  instead), and the drop probability is `drop_p` (mergekit's dare methods call the kept fraction `density`).
- TIES keeps every element whose magnitude reaches the k-th largest, k = max(1, int(density * numel)) as in
  mergekit, found exactly; where magnitudes tie at the threshold it keeps them all, where mergekit's argsort
  picks among them arbitrarily. The elected sign is + where the weighted sum is >= 0 (mergekit; peft gives
  sign 0 there) and the mean divides by the weights of the agreeing models (mergekit's normalize; peft divides
  by their count, the same for unit weights). `density` may be given per model, as in mergekit.
- Sums run in fp32 in slot order with one rounding to the arena's dtype (mergekit sums in the model dtype).
"""

from __future__ import annotations

import math

import torch

from evolver_kernels.kernels.histogram import BUCKETS, magnitude_bits, magnitude_gather, magnitude_histogram
from evolver_kernels.kernels.ops import crossover_mask, merge_tensors
from evolver_kernels.kernels.rng import STREAM_DARE
from evolver_kernels.methods.registry import MergeContext, MergeMethod, Param, boolean, register
from evolver_kernels.methods.streaming import (
    Base,
    base_chunk,
    check_base,
    check_weights,
    merge_linear,
    prefetched,
    read_all,
)
from evolver_kernels.storage.arena import Arena, iter_chunks
from evolver_kernels.storage.population import Population

SCALE = Param("scale", float, 1.0, "task-vector scale (lambda)", aliases=("lambda",))
DENSITY = Param(
    "density",
    float,
    1.0,
    "fraction of each task vector kept, per tensor: by magnitude (TIES; "
    "breadcrumbs below the `gamma` largest), or on average with probabilities by magnitude rank (della)",
    low=0.0,
    high=1.0,
    low_open=True,
    per_model=True,
    search=(0.01, 1.0),
)
NORMALIZE = Param(
    "normalize",
    boolean,
    None,
    "task_arithmetic, ties, dare_*, breadcrumbs*, della*: divide the "
    "sum of the weighted task vectors by the weights summed (of the agreeing models where signs are "
    "elected); mergekit's normalize; default: true for ties, dare_ties and della, false for the others",
)
DROP_P = Param(
    "drop_p", float, 0.5, "DARE: probability that a task-vector element is dropped", low=0.0, high=1.0, high_open=True
)


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


def task_arithmetic(
    pop: Population,
    base: Base,
    out: Arena,
    scale: float,
    weights: list[float] | None = None,
    drop_p: float = 0.0,
    seed: int = 0,
    chunk: int = 1 << 22,
    backend: str | None = None,
    normalize: bool = False,
) -> Arena:
    """out = base + scale * sum_k w_k tau_k (Ilharco et al., task vectors; normalize: divided by sum_k w_k;
    without it a w_k may be negative, task negation); drop_p > 0 makes it DARE."""
    base = check_base(pop, base, "task arithmetic")
    return merge_linear(
        pop,
        out,
        chunk,
        backend,
        base=base,
        weights=_signed_weights(weights, pop.size) if not normalize else check_weights(weights, pop.size),
        scale=scale,
        normalize=normalize,
        drop_p=_check_p(drop_p),
        seed=seed,
    )


def _signed_weights(weights: list[float] | None, n: int) -> list[float]:
    """check_weights' count and length checks, a weight of any sign (task negation): without normalize no sum of
    the weights divides (the signed_weights record field); not all zero."""
    if weights is None:
        return check_weights(None, n)
    check_weights([abs(w) for w in weights], n)  # abs: the same message for all-zero weights
    return [float(w) for w in weights]


def ties(
    pop: Population,
    base: Base,
    out: Arena,
    density: float | list[float],
    scale: float = 1.0,
    weights: list[float] | None = None,
    drop_p: float = 0.0,
    seed: int = 0,
    chunk: int = 1 << 22,
    backend: str | None = None,
    normalize: bool = True,
) -> Arena:
    """TIES-merging (trim, elect sign, disjoint mean; normalize false: the sum of the agreeing), optionally on
    DARE-dropped task vectors. Tensor by tensor: the trim threshold is each tensor's own (without DARE every
    model's found in one pass that reads the base once: kth_largest_magnitudes_of_models), then one fused pass.
    `density` is one fraction for every model or one per model."""
    base = check_base(pop, base, "TIES")
    density = _check_density(density, pop.size)
    densities = density if isinstance(density, list) else [density] * pop.size
    w = check_weights(weights, pop.size)
    drop_p = _check_p(drop_p)
    for e in prefetched(pop, base):
        start = pop.layout.groups[e.group][0]
        dst = out.view(e).view(-1)  # the entry's elements, on the device that holds them
        lo_e, hi_e = e.offset, e.offset + e.numel
        keeps = [max(1, int(densities[k] * e.numel)) for k in range(pop.size)]
        ks = [keep if keep < e.numel else None for keep in keeps]
        if drop_p == 0:  # the models' trims in one pass that reads the base once

            def models(lo, hi, group=e.group, device=dst.device):
                return read_all(pop, group, lo, hi, device), base_chunk(base, group, lo, hi, device)

            trims = [0.0 if t is None else t for t in kth_largest_magnitudes_of_models(models, lo_e, hi_e, ks, chunk)]
        else:
            trims = [0.0] * pop.size
            for k in range(pop.size):
                if ks[k] is not None:

                    def task_vector(lo, hi, k=k, group=e.group, start=start, device=dst.device):
                        return _dare_task_vector(pop, base, k, group, lo, hi, start, drop_p, seed, device, backend)

                    trims[k] = kth_largest_magnitude(task_vector, lo_e, hi_e, ks[k], chunk)
        for lo, hi in iter_chunks(e.numel, chunk):
            merge_tensors(
                read_all(pop, e.group, lo_e + lo, lo_e + hi, dst.device),
                base=base_chunk(base, e.group, lo_e + lo, lo_e + hi, dst.device),
                weights=w,
                trim=trims,
                scale=scale,
                normalize=normalize,
                drop_p=drop_p,
                seed=seed,
                stream=STREAM_DARE,
                offset=start + lo_e + lo,
                out=dst[lo:hi],
                backend=backend,
            )
    return out


def _dare_task_vector(pop, base, k, group, lo, hi, start, drop_p, seed, device, backend):
    """The DARE-dropped tau_k (drop_p > 0) on [lo, hi) of `group` in fp32, exactly as the fused merge computes it
    before trimming (without drops TIES selects from the pairs (x_k, base): kth_largest_magnitudes_of_models)."""
    x, b = pop.read(k, group, lo, hi).to(device), base_chunk(base, group, lo, hi, device)
    tau = x.float() - b.float()
    dropped = crossover_mask(
        hi - lo, CR=drop_p, seed=seed, stream=STREAM_DARE + k, offset=start + lo, device=device, backend=backend
    )
    rescale = torch.tensor(1.0 / (1.0 - drop_p), dtype=torch.float32, device=device)
    return torch.where(dropped, torch.zeros((), device=device), tau * rescale)


def kth_largest_magnitude(values, lo: int, hi: int, k: int, chunk: int = 1 << 22) -> float:
    """The k-th largest |v| over v = values(a, b) for chunks [a, b) of [lo, hi), exactly (the value
    torch.kthvalue(|v|, n - k + 1) gives), in two histogram passes over the fp32 bit patterns (non-negative
    floats order as their bits): the top 16 bits, then the low 16 bits within the chosen bucket."""
    if not 1 <= k <= hi - lo:
        raise ValueError(f"k must be in [1, {hi - lo}], got {k}")
    return kth_largest_magnitudes(values, lo, hi, [k], chunk)[0]


def kth_largest_magnitudes(values, lo: int, hi: int, ks, chunk: int = 1 << 22) -> list[float]:
    """kth_largest_magnitude for several k at once, without a sort at any size: from SAMPLED_MIN elements in one
    pass where a sample settles them (_sampled_kths), the others in two histogram passes shared by them (the
    second histograms the buckets of every such k; a range of at most one chunk is read once). values(a, b) is a chunk's fp32
    values, or a pair (x, base) whose fp32 difference they are (the histogram kernel then forms it, without a
    tensor of it: kernels/histogram.py). `ks` is the list of k's, or a function of the count of non-zero |v|,
    counted in the first pass, that gives them (sce selects a fraction of the non-zero variances); each k must be
    in [1, hi - lo]."""
    if hi - lo <= chunk:
        held = values(lo, hi)

        def values(a: int, b: int):
            return _part(held, a - lo, b - lo)

    found = {} if callable(ks) else _sampled_kths(values, lo, hi, ks, chunk, held if hi - lo <= chunk else None)
    if not callable(ks) and all(k in found for k in ks):
        return [found[k] for k in ks]

    def histogram(slots: torch.Tensor | None, n_slots: int = 1) -> tuple[torch.Tensor, int]:
        """The counts of the top 16 bits (slots None; with the count of zeros when ks needs it), else of the low
        16 bits within each bucket that has a slot, one histogram per slot."""
        counts = None
        zeros = 0
        for a, b in iter_chunks(hi - lo, chunk):
            x, base = _pair(values(lo + a, lo + b))
            if counts is None:
                counts = torch.zeros(n_slots * BUCKETS, dtype=torch.int64, device=x.device)
                slots = None if slots is None else slots.to(x.device)
            magnitude_histogram(counts, x, base, slots)
            if slots is None and callable(ks):
                zeros = zeros + (magnitude_bits(x, base) == 0).sum()  # no sync per chunk
        return counts.cpu(), int(zeros)

    def bucket_of_kth(counts: torch.Tensor, k: int) -> tuple[int, int]:
        """(bucket holding the k-th largest, how many lie in higher buckets)."""
        from_top = counts.flip(0).cumsum(0)
        idx = int(torch.searchsorted(from_top, k))
        return BUCKETS - 1 - idx, int(from_top[idx - 1]) if idx > 0 else 0

    top, zeros = histogram(None)
    wanted = list(ks(hi - lo - zeros)) if callable(ks) else list(ks)
    _check_ks(wanted, hi - lo)
    ks = [k for k in wanted if k not in found]
    if not ks:
        return [found[k] for k in wanted]
    buckets = [bucket_of_kth(top, k) for k in ks]
    highs = sorted({high for high, _ in buckets})
    slots = torch.full((BUCKETS,), -1, dtype=torch.int32)
    slots[highs] = torch.arange(len(highs), dtype=torch.int32)
    lows = histogram(slots, len(highs))[0].view(len(highs), BUCKETS)
    for k, (high, above) in zip(ks, buckets):
        low, _ = bucket_of_kth(lows[highs.index(high)], k - above)
        found[k] = float(torch.tensor((high << 16) | low, dtype=torch.int32).view(torch.float32))
    return [found[k] for k in wanted]


SAMPLED_MIN = 1 << 18  # elements from which a sample narrows the selection to one pass
SAMPLE_BLOCKS = 256  # evenly spaced blocks of contiguous elements
SAMPLE_BLOCK = (64, 512)  # their length: about 1/32 of the range in all, within these bounds (a few pages at most)
GATHER_PIECE = 1 << 18  # elements gathered into several windows at once: a piece of x and base stays in the L2 cache


def _check_ks(ks: list[int], n: int) -> None:
    if any(not 1 <= k <= n for k in ks):
        raise ValueError(f"k must be in [1, {n}], got {ks}")


def _part(v, a: int, b: int):
    """Elements [a, b) of a chunk's values or of its (x, base) pair."""
    return (v[0][a:b], v[1][a:b]) if isinstance(v, tuple) else v[a:b]


def _pair(v) -> tuple[torch.Tensor, torch.Tensor | None]:
    return v if isinstance(v, tuple) else (v, None)


def sample_blocks(n: int) -> tuple[list[int], int]:
    """(starts, length) of the sample's blocks in a range of n >= SAMPLED_MIN elements (offsets from its start)."""
    block = min(max(n // (32 * SAMPLE_BLOCKS), SAMPLE_BLOCK[0]), SAMPLE_BLOCK[1])
    blocks = min(SAMPLE_BLOCKS, n // block)
    return [j * (n - block) // (blocks - 1) for j in range(blocks)], block


def _sampled_kths(values, lo: int, hi: int, ks: list[int], chunk: int, held=None) -> dict[int, float]:
    """The k-th largest magnitudes that one pass settles, exactly (Floyd and Rivest's selection): a deterministic
    sample (evenly spaced blocks) places each k-th between two of the sample's order statistics, a margin of 6
    standard deviations of a sample rank (and 16 more) on either side; one pass over [lo, hi) counts the
    magnitudes above that window and gathers those in it (kernels/histogram.magnitude_gather); a k is settled
    when the counts put its k-th largest in the window, and it is then the right one among the few gathered.
    A k not settled (a sample that misled) is missing from the result: the two histogram passes find it. The
    answer never depends on the sample, only the cost. `held`: values(lo, hi) when the caller holds it whole,
    sampled at once instead of block by block."""
    _check_ks(ks, hi - lo)

    def sources(a: int, b: int):
        x, base = _pair(values(a, b) if held is None else _part(held, a - lo, b - lo))
        return [x], base

    found = _sampled_selection(sources, lo, hi, [(0, k) for k in ks], chunk, whole=held is not None)
    return {k: v for (_, k), v in found.items()}


def kth_largest_magnitudes_of_models(models, lo: int, hi: int, ks: list[int | None], chunk: int) -> list[float | None]:
    """kth_largest_magnitude of |x_j - base| for every model j at once, in one pass that reads the base and each
    model once (TIES' trims), where a sample settles them; models(a, b) gives ([x_j chunk], base chunk), ks[j] is
    model j's k (None: none wanted, None returned). A k the sample misleads on falls back to the histogram
    passes, over that model alone."""
    wants = [(j, k) for j, k in enumerate(ks) if k is not None]
    _check_ks([k for _, k in wants], hi - lo)
    found = _sampled_selection(models, lo, hi, wants, chunk)
    out: list[float | None] = [None] * len(ks)
    for j, k in wants:
        if (j, k) in found:
            out[j] = found[(j, k)]
        else:

            def values(a: int, b: int, j=j):
                xs, base = models(a, b)
                return xs[j], base

            out[j] = kth_largest_magnitudes(values, lo, hi, [k], chunk)[0]
    return out


def _sampled_selection(sources, lo: int, hi: int, wants: list[tuple[int, int]], chunk: int, whole: bool = False):
    """_sampled_kths over several inputs: sources(a, b) gives ([x_i chunk], base chunk or None), `wants` the
    (input, k) pairs; returns {(input, k): value} for those settled. One sample per input, one pass for all
    (every input and the base read once); `whole`: sources(lo, hi) is held (the sample indexed at once)."""
    n = hi - lo
    if n < SAMPLED_MIN or not wants:
        return {}
    starts, block = sample_blocks(n)
    if whole:
        xs, base = sources(lo, hi)
        at = (torch.tensor(starts)[:, None] + torch.arange(block)).view(-1).to(xs[0].device)
        picked = [x.view(-1)[at] for x in xs], None if base is None else base.view(-1)[at]
    else:  # the blocks read one by one, their magnitudes formed at once
        parts = [sources(lo + a, lo + a + block) for a in starts]
        picked = (
            [torch.cat([p[0][i].reshape(-1) for p in parts]) for i in range(len(parts[0][0]))],
            None if parts[0][1] is None else torch.cat([p[1].reshape(-1) for p in parts]),
        )
    samples = {i: magnitude_bits(picked[0][i], picked[1]).view(-1).cpu() for i in {i for i, _ in wants}}
    m = block * len(starts)

    def at_rank(i: int, rank: int) -> int:  # input i's sample's rank-th largest (0-based) bit pattern; no sort
        return int(samples[i].kthvalue(m - rank).values)

    windows = []  # per want: (input, low, high) bits, and the room for what the window holds
    for i, k in wants:
        r = (k - 1) * m / n
        margin = 6.0 * math.sqrt(r * (1.0 - r / m) + 1.0) + 16.0
        top_rank, low_rank = max(0, math.floor(r - margin)), min(m - 1, math.ceil(r + margin))
        low = 0 if low_rank == m - 1 else at_rank(i, low_rank)
        high = 0x7FFFFFFF if top_rank == 0 else at_rank(i, top_rank)
        capacity = int(2 * (low_rank - top_rank + 1) * n / m) + 1024  # twice what the sample expects in it
        windows.append(((i, low, high), capacity))
    # one pass for every want: each piece gathered into every window while it is in the cache
    piece = chunk if len(wants) == 1 else min(chunk, GATHER_PIECE)
    counts = gathered = None
    for a, b in iter_chunks(n, piece):
        xs, base = sources(lo + a, lo + b)
        if counts is None:
            counts = torch.zeros(len(wants), 2, dtype=torch.int64, device=xs[0].device)
            gathered = [torch.empty(c, dtype=torch.int32, device=xs[0].device) for _, c in windows]
        magnitude_gather(counts, gathered, xs, base, [w for w, _ in windows])
    found = {}
    for want, (_, capacity), c, g in zip(wants, windows, counts.cpu(), gathered):
        above, inside = (int(v) for v in c)
        k = want[1]
        if above < k <= above + inside and inside <= capacity:
            rank = k - above  # the rank-th largest of the gathered
            bits = g[:inside].kthvalue(inside - rank + 1).values
            found[want] = float(bits.cpu().view(torch.float32))
    return found


def normalize_of(ctx: MergeContext, default: bool) -> bool:
    """The merge's `normalize`: as given, else the method's own default (NORMALIZE's default is None)."""
    given = ctx.settings.get("normalize")
    return default if given is None else bool(given)


def _task_arithmetic(pop: Population, out: Arena, ctx: MergeContext) -> Arena:
    return task_arithmetic(
        pop,
        ctx.base,
        out,
        ctx.settings["scale"],
        ctx.weights,
        ctx.settings.get("drop_p", 0.0),
        ctx.seed,
        ctx.chunk,
        ctx.backend,
        normalize_of(ctx, False),
    )


def _ties(pop: Population, out: Arena, ctx: MergeContext) -> Arena:
    return ties(
        pop,
        ctx.base,
        out,
        ctx.settings["density"],
        ctx.settings["scale"],
        ctx.weights,
        ctx.settings.get("drop_p", 0.0),
        ctx.seed,
        ctx.chunk,
        ctx.backend,
        normalize_of(ctx, True),
    )


register(
    MergeMethod(
        writes_views=True,
        name="task_arithmetic",
        params=(SCALE, NORMALIZE),
        needs_base=True,
        signed_weights=True,
        merge=_task_arithmetic,
        summary="base + scale * sum_k w_k (x_k - base) (task vectors)",
    )
)
register(
    MergeMethod(
        writes_views=True,
        name="ties",
        params=(SCALE, DENSITY, NORMALIZE),
        needs_base=True,
        merge=_ties,
        summary="TIES: trim each task vector to its top `density` by magnitude, elect signs, mean of the agreeing",
    )
)
register(
    MergeMethod(
        writes_views=True,
        name="dare_linear",
        params=(SCALE, DROP_P, NORMALIZE),
        needs_base=True,
        merge=_task_arithmetic,
        summary="task arithmetic on DARE-dropped task vectors (drop `drop_p`, rescale 1 / (1 - drop_p))",
    )
)
register(
    MergeMethod(
        writes_views=True,
        name="dare_ties",
        params=(SCALE, DENSITY, DROP_P, NORMALIZE),
        needs_base=True,
        merge=_ties,
        summary="TIES on DARE-dropped task vectors",
    )
)


# -- per-model task vectors and values, shared by the sparsifying methods (sparsify.py, della.py) ----------
TWO_32 = 4294967296.0


def per_model_values(value, n: int, name: str, low: float, high: float) -> list[float]:
    """One value for every model, or one per model, each in [low, high]."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} given for {n} models")
    if any(not low <= float(v) <= high for v in values):
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value}")
    return [float(v) for v in values]


def densities_of(density, n: int) -> list[float]:
    density = _check_density(density, n)
    return density if isinstance(density, list) else [density] * n
