"""Task-vector methods (tau_k = x_k - base): task arithmetic, TIES and DARE, streamed through the fused
operator merge_tensors, with TIES' per-tensor trim thresholds found exactly without a sort (methods/selection.py).
On the CPU, TIES without DARE finds them in its own merging pass (_ties_in_one_pass: kernels/ties_windows.py),
the models read once; elsewhere one selecting pass, then the merge.

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

import torch

from evolver_kernels.kernels import ties_windows
from evolver_kernels.kernels.ops import crossover_mask, merge_tensors
from evolver_kernels.kernels.rng import STREAM_DARE
from evolver_kernels.methods.registry import MergeContext, MergeMethod, Param, boolean, register
from evolver_kernels.methods.selection import (
    SAMPLED_MIN,
    kth_largest_magnitude,
    kth_largest_magnitudes_of_models,
    sample_windows,
    settle_windows,
)
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
    DARE-dropped task vectors. Tensor by tensor: the trim threshold is each tensor's own; without DARE found in the
    merging pass itself on the CPU (_ties_in_one_pass), else every model's in one pass that reads the base once
    (selection.kth_largest_magnitudes_of_models), then one fused pass. `density` is one fraction for every model
    or one per model."""
    base = check_base(pop, base, "TIES")
    density = _check_density(density, pop.size)
    densities = density if isinstance(density, list) else [density] * pop.size
    w = check_weights(weights, pop.size)
    drop_p = _check_p(drop_p)
    for e in prefetched(pop, base):
        start = pop.layout.groups[e.group][0]
        dst = out.view(e).view(-1)  # the entry's elements, on the device that holds them
        lo_e = e.offset
        keeps = [max(1, int(densities[k] * e.numel)) for k in range(pop.size)]
        ks = [keep if keep < e.numel else None for keep in keeps]

        def entry(a, b, group=e.group, at=lo_e, device=dst.device):  # ([x_k], base) of the entry's [a, b)
            return read_all(pop, group, at + a, at + b, device), base_chunk(base, group, at + a, at + b, device)

        if drop_p == 0:
            if _ties_in_one_pass(entry, e.numel, ks, w, scale, normalize, chunk, dst, backend):
                continue
            # the models' trims in one pass that reads the base once, then the merge
            trims = [0.0 if t is None else t for t in kth_largest_magnitudes_of_models(entry, 0, e.numel, ks, chunk)]
        else:
            trims = [0.0] * pop.size
            for k in range(pop.size):
                if ks[k] is not None:

                    def task_vector(lo, hi, k=k, group=e.group, start=start, device=dst.device):
                        return _dare_task_vector(pop, base, k, group, lo, hi, start, drop_p, seed, device, backend)

                    trims[k] = kth_largest_magnitude(task_vector, lo_e, lo_e + e.numel, ks[k], chunk)
        for lo, hi in iter_chunks(e.numel, chunk):
            xs, b = entry(lo, hi)
            merge_tensors(
                xs,
                base=b,
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


# Where the one pass is taken: at most ONE_PASS_MODELS models, recording at most ONE_PASS_RECORDS of a tensor's
# elements to merge again (each with its n + 1 inputs). Measured on the 2-core VM (benchmarks/RESULTS.md), page
# cache warm: 3 models of 7B shape at density 0.3 record 5% of each tensor, the one pass 6.1 to 6.9 s against the
# two passes' 6.9 to 7.3; 5 models of 125M, 2.9 to 3.3 s against 2.0 to 2.4: there the two passes are taken.
ONE_PASS_MODELS = 3
ONE_PASS_RECORDS = 0.06


def _ties_in_one_pass(entry, numel: int, ks, weights, scale, normalize, chunk, dst, backend) -> bool:
    """TIES of one tensor with the trims found in the merging pass (kernels/ties_windows.py), where the CPU
    extension runs the merge, a sample applies (every k given, SAMPLED_MIN elements) and where it was measured
    faster than the two passes (ONE_PASS_MODELS, ONE_PASS_RECORDS): a sample places each
    model's trim in a window (selection.sample_windows); one fused pass merges trimming below the windows, counting
    and gathering what they hold and recording each element in some window; the trims settled
    (selection.settle_windows), those elements are merged again with them. The same bits as the two passes give.
    False where it does not apply, where the sample finds magnitudes tied around a trim or too many elements in the
    windows (the two passes are then cheaper), or where a sample misled or the records overflowed: dst is then to be
    merged again. entry(a, b): ([x_k], base) of the tensor's elements [a, b)."""
    n = len(ks)
    if numel < SAMPLED_MIN or None in ks or n > ONE_PASS_MODELS:
        return False
    xs0, b0 = entry(0, 1)
    if not ties_windows.available(xs0, b0, dst, backend) or any(t.data_ptr() == dst.data_ptr() for t in [*xs0, b0]):
        return False  # an output that is an input: a pass that fails after it would leave the inputs overwritten
    wants = list(enumerate(ks))
    windows, sample = sample_windows(entry, 0, numel, wants)
    inside = [(sample[w.input] >= w.low) & (sample[w.input] <= w.high) for w in windows]
    share = numel / len(sample[0])  # elements per sampled one
    if any(int(s.sum()) * share > 0.75 * w.capacity for s, w in zip(inside, windows)):
        return False  # magnitudes tied around a trim (bf16 task vectors of small updates): the gather would overflow
    recorded = int(torch.stack(inside).any(0).sum()) * share  # the elements some window holds, as the sample sees
    if recorded > numel * ONE_PASS_RECORDS:
        return False
    room = int(1.5 * recorded) + 4096
    counts = torch.zeros(n, 2, dtype=torch.int64)
    gathered = [torch.empty(w.capacity, dtype=torch.int32) for w in windows]
    fix_index, fix_count = torch.empty(room, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    fix_values = torch.empty(n + 1, room, dtype=dst.dtype)
    for lo, hi in iter_chunks(numel, chunk):
        xs, b = entry(lo, hi)
        ties_windows.ties_window_merge(
            xs,
            b,
            weights=weights,
            scale=scale,
            normalize=normalize,
            windows=[(w.low, w.high) for w in windows],
            index_base=lo,
            gathered=gathered,
            counts=counts,
            fix_index=fix_index,
            fix_values=fix_values,
            fix_count=fix_count,
            out=dst[lo:hi],
        )
    found = settle_windows(wants, windows, counts, gathered)
    fixes = int(fix_count)
    if len(found) < n or fixes > room:
        return False
    if fixes:
        dst[fix_index[:fixes]] = merge_tensors(
            [fix_values[k, :fixes] for k in range(n)],
            base=fix_values[n, :fixes],
            weights=weights,
            trim=[found[want] for want in wants],
            scale=scale,
            normalize=normalize,
            backend=backend,
        )
    return True


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
