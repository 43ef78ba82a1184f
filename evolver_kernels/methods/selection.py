"""Exact k-th largest magnitudes |x - base| of a tensor streamed in chunks (TIES' and breadcrumbs' trims, sce's
variances), without a sort: a deterministic sample narrows each k-th to a window of fp32 bit patterns, one pass
counts what lies above the window and gathers what lies in it (Floyd and Rivest's selection; sample_windows,
settle_windows), else two radix-histogram passes (kth_largest_magnitudes). Memory O(chunk), not O(tensor).
The answer never depends on the sample, only the cost.
"""

from __future__ import annotations

import math

import torch

from evolver_kernels.kernels.histogram import BUCKETS, magnitude_bits, magnitude_gather, magnitude_histogram
from evolver_kernels.storage.arena import iter_chunks


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
    windows, _ = sample_windows(sources, lo, hi, wants, whole)
    # one pass for every want: each piece gathered into every window while it is in the cache
    piece = chunk if len(wants) == 1 else min(chunk, GATHER_PIECE)
    counts = gathered = None
    for a, b in iter_chunks(n, piece):
        xs, base = sources(lo + a, lo + b)
        if counts is None:
            counts = torch.zeros(len(wants), 2, dtype=torch.int64, device=xs[0].device)
            gathered = [torch.empty(w.capacity, dtype=torch.int32, device=xs[0].device) for w in windows]
        magnitude_gather(counts, gathered, xs, base, [(w.input, w.low, w.high) for w in windows])
    return settle_windows(wants, windows, counts, gathered)


class Window:
    """Where a sample placed input `input`'s k-th largest magnitude: the fp32 bits [low, high]; `expected`: how
    many magnitudes the sample expects in it, `capacity`: the room a gather gives them (twice as many)."""

    def __init__(self, input: int, low: int, high: int, expected: float):
        self.input, self.low, self.high, self.expected = input, low, high, expected
        self.capacity = int(2 * expected) + 1024


def sample_windows(
    sources, lo: int, hi: int, wants: list[tuple[int, int]], whole: bool = False
) -> tuple[list[Window], dict[int, torch.Tensor]]:
    """(one Window per (input, k) of `wants` over [lo, hi) (at least SAMPLED_MIN elements), the sample: input ->
    the int32 bits of its sampled magnitudes, the same places for every input). The sample's blocks
    (sample_blocks) are read one by one (`whole`: sources(lo, hi) is held, and indexed at once), each k-th placed
    between two of the sample's order statistics, a margin of 6 standard deviations of a sample rank (and 16
    more) on either side. sources(a, b) gives ([x_i chunk], base chunk or None)."""
    n = hi - lo
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

    windows = []
    for i, k in wants:
        r = (k - 1) * m / n
        margin = 6.0 * math.sqrt(r * (1.0 - r / m) + 1.0) + 16.0
        top_rank, low_rank = max(0, math.floor(r - margin)), min(m - 1, math.ceil(r + margin))
        low = 0 if low_rank == m - 1 else at_rank(i, low_rank)
        high = 0x7FFFFFFF if top_rank == 0 else at_rank(i, top_rank)
        windows.append(Window(i, low, high, (low_rank - top_rank + 1) * n / m))
    return windows, samples


def settle_windows(wants: list[tuple[int, int]], windows: list[Window], counts, gathered) -> dict:
    """{(input, k): the k-th largest magnitude} for the wants a pass over their windows settled: counts[w] = (how
    many lie above window w, how many in it), gathered[w] what lies in it (int32 bits; all of them when they fit
    its capacity). A want is settled when its k-th largest lies in its window."""
    found = {}
    for want, window, c, g in zip(wants, windows, counts.cpu(), gathered):
        above, inside = (int(v) for v in c)
        k = want[1]
        if above < k <= above + inside and inside <= window.capacity:
            rank = k - above  # the rank-th largest of the gathered
            bits = g[:inside].kthvalue(inside - rank + 1).values
            found[want] = float(bits.cpu().view(torch.float32))
    return found
