"""DELLA (della, della_linear; registered in methods/sparsify.py, whose docstring gives the formula and where ours
differs from mergekit): per-row magnitude ranks into per-element drop thresholds, then the fused operator's
drops with each model's L1 factor, streamed over spans of whole rows."""

from __future__ import annotations

import math

import torch

from evolver_kernels.kernels.drop_bits import expand_drops, packed_size
from evolver_kernels.kernels.ops import merge_tensors
from evolver_kernels.kernels.ranks import rank_drop_bits
from evolver_kernels.kernels.rescale import add_dropped_l1
from evolver_kernels.kernels.rng import STREAM_DARE, random_words
from evolver_kernels.methods.registry import Param, boolean
from evolver_kernels.methods.streaming import Base, base_chunk, check_base, check_weights, per_model_chunk, prefetched
from evolver_kernels.methods.task_vectors import TWO_32, densities_of, per_model_values
from evolver_kernels.storage.arena import Arena, Entry
from evolver_kernels.storage.population import Population

INF = float("inf")
RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor: no rescaling when either L1 norm is below it

EPSILON = Param(
    "epsilon",
    float,
    0.15,
    "della: keep probabilities run from density - epsilon (a row's smallest "
    "magnitude) to density + epsilon (its largest); density +- epsilon must lie in (0, 1)",
    low=0.0,
    high=1.0,
    high_open=True,
    per_model=True,
)
RESCALE = Param(
    "rescale",
    boolean,
    True,
    "della: scale each sparsified task vector back to its L1 norm, per tensor (mergekit's rescale)",
)


def della_rows(e: Entry, ranked: bool = True) -> tuple[int, int]:
    """(rows, row length) della ranks entry `e` in: a matrix's rows, a vector (or scalar) as one row. Unranked
    (every epsilon 0: every element's keep probability is its density) any tensor is rows of one element."""
    if not ranked:
        return e.numel, 1
    if len(e.shape) > 2:
        raise ValueError(
            f"della ranks magnitudes along dimension 1 of a tensor (mergekit's della_magprune); "
            f"{e.name} has {len(e.shape)} dimensions, which is not supported"
        )
    return (e.shape[0], e.shape[1]) if len(e.shape) == 2 else (1, e.numel)


def della_table(cols: int, density: float, epsilon: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 [cols]: della's drop threshold of rank r = 0 .. cols - 1 (0 the smallest magnitude) in a row of
    `cols`: keep probability p = density - epsilon + 2 epsilon r / (cols - 1) (density where cols == 1), in fp64;
    the threshold floor((1 - p) 2**32), against which the element's Philox word is compared."""
    ranks = torch.arange(cols, dtype=torch.float64, device=device)
    if cols > 1:
        rank_norm = ranks / (cols - 1)
    else:
        rank_norm = torch.full((cols,), 0.5, dtype=torch.float64, device=device)
    p = (density - epsilon) + rank_norm * (2 * epsilon)
    return ((1 - p) * TWO_32).floor().to(torch.int64)


def della_thresholds(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """int64 [R, C]: della's drop threshold of each element of task-vector rows `tau` [R, C]: della_table's
    entry for the rank of |tau| in its row (ties by index). The formula by torch's stable argsort, for tests."""
    rows, cols = tau.shape
    if epsilon == 0:  # no rank matters: p = density everywhere, as the formula gives it (mergekit's dare)
        threshold = math.floor((1 - density) * TWO_32)
        return torch.full((rows, cols), threshold, dtype=torch.int64, device=tau.device)
    order = torch.argsort(tau.abs(), dim=1, stable=True)
    table = della_table(cols, density, epsilon, tau.device)
    return torch.empty_like(order).scatter_(1, order, table.expand(rows, cols))


def della_kept(tau: torch.Tensor, density: float, epsilon: float, seed: int, stream: int, offset: int) -> torch.Tensor:
    """Bool [R, C]: which elements of task-vector rows `tau` [R, C] della keeps: element j (global index
    offset + j) is dropped where its Philox word on `stream` is below its della_thresholds value. The formula
    with the oracle's words, for tests; the merge draws the words inside the fused operator."""
    rows, cols = tau.shape
    words = random_words(rows * cols, seed=seed, stream=stream, offset=offset, device=tau.device)
    return words.view(rows, cols) >= della_thresholds(tau, density, epsilon)


def _check_della(densities: list[float], epsilons: list[float]) -> None:
    for d, eps in zip(densities, epsilons):
        if d < 1 and (d + eps >= 1 or d - eps <= 0):
            raise ValueError(
                f"della: epsilon must be chosen such that density +/- epsilon is in (0, 1), got "
                f"density {d} and epsilon {eps}"
            )


def della(
    pop: Population,
    base: Base,
    out: Arena,
    density: float | list[float] = 1.0,
    epsilon: float | list[float] = 0.15,
    scale: float = 1.0,
    weights: list[float] | None = None,
    ties: bool = True,
    rescale: bool = True,
    seed: int = 0,
    chunk: int = 1 << 22,
    backend: str | None = None,
    normalize: bool | None = None,
) -> Arena:
    """DELLA (ties=True: sign election and the mean of the agreeing; False: della_linear, the weighted sum),
    tensor by tensor on spans of whole rows. `normalize` (None: ties) divides by the agreeing weights (ties) or
    by all of them (linear)."""
    base = check_base(pop, base, "della")
    n = pop.size
    densities = densities_of(density, n)
    epsilons = per_model_values(epsilon, n, "epsilon", 0.0, 1.0)
    _check_della(densities, epsilons)
    w = check_weights(weights, n)
    sparse = [k for k in range(n) if densities[k] < 1]
    ranked = any(epsilons[k] > 0 for k in sparse)
    normalize = ties if normalize is None else normalize

    constants: dict[int, torch.Tensor] = {}  # model -> its one threshold, as long as the longest span so far
    held: dict[int, torch.Tensor] = {}  # model -> its int64 buffer of per-element thresholds, reused by every span

    def buffer(k: int, numel: int, device: torch.device) -> torch.Tensor:
        if k not in held or held[k].numel() < numel or held[k].device != device:
            held[k] = torch.empty(numel, dtype=torch.int64, device=device)
        return held[k][:numel]

    stores: dict[int, torch.Tensor] = {}  # model -> the bits of its spans of one tensor, reused by every tensor

    def store(k: int, byte_at: list[int], s: int, device: torch.device) -> torch.Tensor:
        """Model k's bytes for the bits of span s, of spans starting at byte_at[s] (byte_at[-1]: their end)."""
        if k not in stores or stores[k].numel() < byte_at[-1] or stores[k].device != device:
            stores[k] = torch.empty(byte_at[-1], dtype=torch.uint8, device=device)
        return stores[k][byte_at[s] : byte_at[s + 1]]

    def drops_of(
        e: Entry, k: int, x: torch.Tensor, base: torch.Tensor | None, offset: int, byte_at: list[int], s: int
    ) -> torch.Tensor:
        """What drops model k's della_thresholds of x - base (span s of entry e's whole rows, at global index
        `offset`): with every rank alike (epsilon 0) its one threshold for every element, else the drops decided,
        as bits in model k's store (store(k, byte_at, s))."""
        if epsilons[k] == 0:  # every rank alike: one threshold, filled once and read by every span
            one = constants.get(k)
            if one is None or one.numel() < x.numel() or one.device != x.device:
                threshold = math.floor((1 - densities[k]) * TWO_32)
                one = constants[k] = torch.full((x.numel(),), threshold, dtype=torch.int64, device=x.device)
            return one[: x.numel()]
        table = della_table(della_rows(e, ranked)[1], densities[k], epsilons[k], x.device)
        bits = store(k, byte_at, s, x.device)
        return rank_drop_bits(x, base, table, seed=seed, stream=STREAM_DARE + k, offset=offset, out=bits)

    for e in prefetched(pop, base):
        if e.numel == 0:
            continue
        dst = out.view(e).view(-1)
        rows, cols = della_rows(e, ranked)
        per = max(1, per_model_chunk(chunk, n) // cols)  # whole rows
        spans = [(r0 * cols, min(rows, r0 + per) * cols) for r0 in range(0, rows, per)]
        start = pop.layout.groups[e.group][0] + e.offset
        byte_at = [0]  # where each span's bits start in a model's store
        for lo, hi in spans:
            byte_at.append(byte_at[-1] + packed_size(hi - lo))

        factors = [1.0] * n
        decided: dict[tuple[int, int], torch.Tensor] = {}  # (span, model) -> its ranked drops as bits
        if rescale and sparse:
            sums = torch.zeros(n, 2, dtype=torch.float64, device=dst.device)  # L1 before, after the drops
            for s, (lo, hi) in enumerate(spans):
                a, b = e.offset + lo, e.offset + hi
                base_c = base_chunk(base, e.group, a, b, dst.device)
                for k in sparse:
                    x = pop.read(k, e.group, a, b).to(dst.device)
                    drops = drops_of(e, k, x, base_c, start + lo, byte_at, s)
                    if drops.dtype == torch.uint8:  # kept: the merge's pass does not rank again
                        decided[s, k] = drops
                    else:
                        drops = drops[:1]  # one threshold for every element: none read per element
                    add_dropped_l1(sums[k], x, base_c, drops, seed=seed, stream=STREAM_DARE + k, offset=start + lo)
            for k in sparse:
                b, a = (float(v) for v in sums[k])
                if b >= RESCALE_EPS and a >= RESCALE_EPS:
                    factors[k] = b / a
        for s, (lo, hi) in enumerate(spans):
            a, b = e.offset + lo, e.offset + hi
            base_c = base_chunk(base, e.group, a, b, dst.device)
            xs = [pop.read(k, e.group, a, b).to(dst.device) for k in range(n)]
            drops: list[torch.Tensor | None] = [None] * n
            for k in sparse:
                d = decided.pop((s, k), None)
                d = drops_of(e, k, xs[k], base_c, start + lo, byte_at, s) if d is None else d
                # the merge takes thresholds: bits as 2**32 (dropped) or 0, in a buffer every span reuses
                drops[k] = expand_drops(d, hi - lo, buffer(k, hi - lo, dst.device)) if d.dtype == torch.uint8 else d
            merge_tensors(
                xs,
                base=base_c,
                weights=w,
                drop_thresholds=drops,
                drop_rescales=factors,
                elect=ties,
                normalize=normalize,
                scale=scale,
                seed=seed,
                stream=STREAM_DARE,
                offset=start + lo,
                out=dst[lo:hi],
                backend=backend,
            )
    return out
