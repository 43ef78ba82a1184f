"""Streaming merge methods against straightforward stacking references (mergekit's generalized task arithmetic
semantics; tests/test_mergekit.py runs mergekit itself), on every backend."""

import pytest
import torch
from _util import assert_within_one_ulp

import evolver_kernels
from evolver_kernels import methods
from evolver_kernels.kernels.reference import crossover_mask_reference
from evolver_kernels.kernels.rng import STREAM_DARE
from evolver_kernels.methods import merger
from evolver_kernels.methods.statistics import FisherStats
from evolver_kernels.storage.arena import Arena, Layout
from evolver_kernels.storage.population import MemoryPopulation

BACKENDS_HERE = evolver_kernels.available_backends("cpu")


def _setup(dtype=torch.float32, n=4, seed=0):
    layout = Layout.from_params([(("w1",), dtype, (37, 11)), (("w2",), dtype, (129,)), (("w3",), dtype, (5, 3))])
    pop = MemoryPopulation(layout, n, "cpu")
    gen = torch.Generator().manual_seed(seed)
    base = Arena.empty(layout)
    for e in layout.entries:
        base.view(e).copy_(torch.randn(e.shape, generator=gen))
    for arena in pop.arenas:
        for e in layout.entries:
            arena.view(e).copy_(base.view(e).float() + 0.1 * torch.randn(e.shape, generator=gen))
    return layout, pop, base


def _random_fisher(layout, n, seed):
    stats = FisherStats.zeros(layout, n)
    gen = torch.Generator().manual_seed(seed)
    for bufs in stats.buffers:
        for b in bufs.values():
            b.copy_(torch.rand(b.shape, generator=gen) + 1e-3)
    return stats


def _stack(pop, e):
    return torch.stack([pop.arenas[k].view(e).float() for k in range(pop.size)])


def _dare_ref(tau, k, e, layout, p, seed):
    offset = layout.groups[e.group][0] + e.offset
    drop = crossover_mask_reference(e.numel, CR=p, seed=seed, stream=STREAM_DARE + k, offset=offset).view(e.shape)
    return torch.where(drop, 0.0, tau) / (1 - p)


def _ties_ref(taus, density, weights, normalize=True):
    """mergekit: magnitude prune (top k = max(1, int(density * numel))), majority sign of the weighted sum
    (+ where it is >= 0), mean of the agreeing weighted values divided by the agreeing weights (normalize
    false: their sum)."""
    pruned = []
    for t in taus:
        k = max(1, int(density * t.numel()))
        mask = torch.zeros(t.numel(), dtype=torch.bool)
        mask[t.abs().flatten().topk(k).indices] = True
        pruned.append(t * mask.view(t.shape))
    w = torch.tensor(weights).view(-1, *[1] * taus[0].dim())
    stacked = torch.stack(pruned) * w
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == sign
    divisor = (w * agree).sum(0)
    if not normalize:
        return (stacked * agree).sum(0)
    return (stacked * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)


@pytest.mark.parametrize("chunk", [64, 1 << 20])
def test_weighted_average(chunk):
    layout, pop, _ = _setup()
    out = merger.average(pop, Arena.empty(layout), weights=[1, 2, 0, 1], chunk=chunk)
    for e in layout.entries:
        want = (_stack(pop, e) * torch.tensor([1.0, 2, 0, 1]).view(-1, 1, *[1] * (len(e.shape) - 1))).sum(0) / 4
        assert_within_one_ulp(out.view(e), want.to(out.view(e).dtype), e.name)


@pytest.mark.parametrize("drop_p", [0.0, 0.3])
def test_task_arithmetic_and_dare(drop_p):
    layout, pop, base = _setup()
    out = merger.task_arithmetic(pop, base, Arena.empty(layout), scale=0.7, drop_p=drop_p, seed=5, chunk=64)
    for e in layout.entries:
        b = base.view(e).float()
        taus = [pop.arenas[k].view(e).float() - b for k in range(4)]
        if drop_p:
            taus = [_dare_ref(t, k, e, layout, drop_p, 5) for k, t in enumerate(taus)]
        torch.testing.assert_close(out.view(e), b + 0.7 * sum(taus), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("drop_p", [0.0, 0.25])
def test_ties_matches_mergekit_semantics(density, drop_p):
    layout, pop, base = _setup()
    weights = [1.0, 0.5, 1.0, 2.0]
    out = merger.ties(
        pop, base, Arena.empty(layout), density=density, scale=0.9, weights=weights, drop_p=drop_p, seed=2
    )
    for e in layout.entries:
        b = base.view(e).float()
        taus = [pop.arenas[k].view(e).float() - b for k in range(4)]
        if drop_p:
            taus = [_dare_ref(t, k, e, layout, drop_p, 2) for k, t in enumerate(taus)]
        torch.testing.assert_close(out.view(e), b + 0.9 * _ties_ref(taus, density, weights), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_mergekits_normalize_against_its_default(method):
    """mergekit's normalize, the other way round from each method's default: task arithmetic divided by the
    weights summed, TIES the sum of the agreeing (mergekit's bio-merge example)."""
    layout, pop, base = _setup()
    weights = [1.0, 0.5, 1.0, 2.0]
    normalize = method == "task_arithmetic"
    settings = {"scale": 0.9, "normalize": normalize} | ({"density": 0.4} if method == "ties" else {})
    out = merger.Merger(method, base, weights=weights, **settings)(pop, Arena.empty(layout), chunk=64)
    settings.pop("normalize")
    default = merger.Merger(method, base, weights=weights, **settings)(pop, Arena.empty(layout), chunk=64)
    for e in layout.entries:
        b = base.view(e).float()
        taus = [pop.arenas[k].view(e).float() - b for k in range(4)]
        if method == "ties":
            want = b + 0.9 * _ties_ref(taus, 0.4, weights, normalize=False)
        else:
            want = b + 0.9 * sum(w * t for w, t in zip(weights, taus)) / sum(weights)
        torch.testing.assert_close(out.view(e), want, rtol=1e-5, atol=1e-6)
        assert (default.view(e) - out.view(e)).abs().max() > 1e-3  # not vacuous: the flag changed the merge


SETTINGS = {"scale": 0.8, "density": 0.3, "drop_p": 0.2}
DESCRIPTIONS = {
    "average": "simple average",
    "fisher": "Fisher-weighted average",
    "task_arithmetic": "task_arithmetic (scale 0.8)",
    "dare_linear": "dare_linear (scale 0.8, drop p 0.2)",
    "ties": "ties (scale 0.8, density 0.3)",
    "dare_ties": "dare_ties (scale 0.8, density 0.3, drop p 0.2)",
}


@pytest.mark.parametrize("backend", [b for b in BACKENDS_HERE if b != "cpu"])
@pytest.mark.parametrize("method", list(DESCRIPTIONS))
def test_every_backend_gives_the_same_bits(backend, method):
    """Every backend that runs on this machine's CPU tensors (from available_backends, so a GPU host does not
    hand CPU tensors to triton) gives the cpu backend's bits, chunked differently."""
    layout, pop, base = _setup(dtype=torch.bfloat16)
    record = methods.get(method)
    settings = {k: v for k, v in SETTINGS.items() if record.param(k) is not None}
    stats = _random_fisher(layout, pop.size, seed=3) if method == "fisher" else None

    def bound(backend):
        return merger.Merger(
            method, base if record.needs_base else None, seed=4, stats=stats, backend=backend, **settings
        )

    want = bound("cpu")(pop, Arena.empty(layout), chunk=1 << 20)
    got = bound(backend)(pop, Arena.empty(layout), chunk=100)
    assert bound(backend).describe() == DESCRIPTIONS[method]
    assert torch.equal(got.buffers["bfloat16"].view(torch.int16), want.buffers["bfloat16"].view(torch.int16))


def test_fisher_weighted_average():
    layout, pop, _ = _setup()
    fisher = _random_fisher(layout, pop.size, seed=1)
    out = merger.average(pop, Arena.empty(layout), weights=[1, 2, 1, 1], fisher=fisher, chunk=50)
    for e in layout.entries:
        lo, hi = e.offset, e.offset + e.numel
        f = torch.stack([fisher.read(k, e.group, lo, hi).view(e.shape) for k in range(4)])
        w = torch.tensor([1.0, 2, 1, 1]).view(-1, *[1] * len(e.shape))
        want = (w * f * _stack(pop, e)).sum(0) / (w * f).sum(0)
        torch.testing.assert_close(out.view(e), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,k", [(1, 1), (1000, 1), (1000, 537), (1000, 1000), (70_001, 12_345)])
def test_kth_largest_magnitude_is_exact(n, k):
    gen = torch.Generator().manual_seed(n + k)
    v = torch.randn(n, generator=gen) * torch.logspace(-30, 30, n).float()
    v[::7] = v[-1]  # ties at one magnitude
    want = float(v.abs().kthvalue(n - k + 1).values)
    for chunk in (999, n):  # chunked passes, and one chunk read once
        assert merger.kth_largest_magnitude(lambda a, b: v[a:b], 0, n, k, chunk=chunk) == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [333, 1 << 22])
def test_kth_largest_magnitude_of_pairs_is_the_task_vectors(dtype, chunk):
    """values() may give (x, base): the magnitudes are |x - base| in fp32, the task vector the merge trims."""
    gen = torch.Generator().manual_seed(3)
    n = 5001
    x, b = (torch.randn(n, generator=gen).to(dtype) for _ in range(2))
    b[::11] = x[::11]  # zeros
    tau = (x.float() - b.float()).abs()
    ks = [1, 17, 2500, n]
    got = merger_kths(lambda lo, hi: (x[lo:hi], b[lo:hi]), n, ks, chunk)
    assert got == [float(tau.kthvalue(n - k + 1).values) for k in ks]
    nonzero = int((tau != 0).sum())
    assert merger_kths(lambda lo, hi: (x[lo:hi], b[lo:hi]), n, lambda nz: [nz], chunk) == [
        float(tau.kthvalue(n - nonzero + 1).values)
    ]


def merger_kths(values, n, ks, chunk):
    from evolver_kernels.methods.selection import kth_largest_magnitudes

    return kth_largest_magnitudes(values, 0, n, ks, chunk)


def test_bad_arguments_are_named():
    layout, pop, base = _setup()
    out = Arena.empty(layout)
    with pytest.raises(ValueError, match="needs a base model"):
        merger.ties(pop, None, out, density=0.5)
    with pytest.raises(ValueError, match="density must be in \\(0, 1\\]"):
        merger.ties(pop, base, out, density=0.0)
    with pytest.raises(ValueError, match="density must be in \\(0, 1\\]"):
        merger.ties(pop, base, out, density=1.5)
    with pytest.raises(ValueError, match="drop_p must be in \\[0, 1\\)"):
        merger.task_arithmetic(pop, base, out, scale=1.0, drop_p=1.0)
    with pytest.raises(ValueError, match="weights: 3 given for 4 models"):
        merger.average(pop, out, weights=[1, 1, 1])
    other, _, _ = _setup(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="base: its parameters differ"):
        merger.task_arithmetic(pop, Arena.empty(other), out, scale=1.0)


def test_merges_never_stack_the_population():
    """Peak extra memory of every merge is O(N x chunk), not O(N x model) nor O(tensor)."""
    from torch.profiler import ProfilerActivity, profile

    layout, pop, base = _setup(n=6)
    out = Arena.empty(layout)
    for run in (
        lambda: merger.average(pop, out, chunk=64),
        lambda: merger.ties(pop, base, out, density=0.3, drop_p=0.2, chunk=64),
    ):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        biggest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
        assert biggest <= max(64 * 4 * 2, (1 << 16) * 8)  # a chunk's fp32 values, or the radix histogram


def test_inputs_are_left_untouched():
    layout, pop, base = _setup()
    before = [a.buffers["float32"].clone() for a in pop.arenas] + [base.buffers["float32"].clone()]
    merger.task_arithmetic(pop, base, Arena.empty(layout), scale=0.5, drop_p=0.1)
    merger.ties(pop, base, Arena.empty(layout), density=0.3)
    merger.average(pop, Arena.empty(layout))
    after = [a.buffers["float32"] for a in pop.arenas] + [base.buffers["float32"]]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_regmean_solves_the_closed_form_and_tracks_changed_individuals():
    from evolver_kernels.methods.statistics import RegMean

    layout = Layout.from_params([(("lin.weight",), torch.float32, (5, 7)), (("norm",), torch.float32, (7,))])
    pop = MemoryPopulation(layout, 3, "cpu")
    gen = torch.Generator().manual_seed(0)
    for arena in pop.arenas:
        arena.buffers["float32"].copy_(torch.randn(arena.buffers["float32"].shape, generator=gen))
    grams = []
    for _ in range(3):
        x = torch.randn(40, 7, generator=gen)
        grams.append({"lin.weight": x.T @ x / 40})
    alpha = 0.6

    def closed_form():
        reduced = [
            alpha * g["lin.weight"].double() + (1 - alpha) * torch.diag(g["lin.weight"].double().diagonal())
            for g in grams
        ]
        rhs = sum(r @ pop.arenas[k].view(layout.entries[0]).double().T for k, r in enumerate(reduced))
        return torch.linalg.solve(sum(reduced), rhs).T

    regmean = RegMean(layout, grams, alpha)
    bound = merger.Merger("regmean", stats=regmean, alpha=alpha)
    out = bound(pop, Arena.empty(layout))
    torch.testing.assert_close(out.view(layout.entries[0]).double(), closed_form(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.view(layout.entries[1]), _stack(pop, layout.entries[1]).mean(0))
    pop.arenas[1].buffers["float32"].mul_(2)  # individual 1 replaced: its cached term must be recomputed
    bound.changed(1)
    out = bound(pop, Arena.empty(layout))
    torch.testing.assert_close(out.view(layout.entries[0]).double(), closed_form(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="alpha must be in"):
        RegMean(layout, grams, 1.5)
    with pytest.raises(ValueError, match="regmean needs its statistics"):
        merger.Merger("regmean")


@pytest.mark.parametrize("chunk", [1 << 22, 100_003])
def test_sampled_selection_is_exact_and_falls_back(chunk):
    """Above SAMPLED_MIN elements a sample narrows each k-th to a window counted in one pass; the answer is the
    exact k-th (kthvalue's) whether the window settles it or, where the sample misleads, the histograms do."""
    from evolver_kernels.methods import selection as tv

    n = tv.SAMPLED_MIN + 4099
    gen = torch.Generator().manual_seed(5)
    x, b = (torch.randn(n, generator=gen).bfloat16() for _ in range(2))
    b[::3] = x[::3]
    tau = (x.float() - b.float()).abs()
    ks = [1, 7, n // 3, n // 2 + 1, n - 5, n]
    want = [float(tau.kthvalue(n - k + 1).values) for k in ks]
    assert merger_kths(lambda lo, hi: (x[lo:hi], b[lo:hi]), n, ks, chunk) == want
    settled = tv._sampled_kths(lambda lo, hi: (x[lo:hi], b[lo:hi]), 0, n, ks, chunk)
    assert {n // 3, n // 2 + 1} <= set(settled) and all(settled[k] == want[ks.index(k)] for k in settled)
    # the same sample taken at once from a range held whole
    assert tv._sampled_kths(lambda lo, hi: (x[lo:hi], b[lo:hi]), 0, n, ks, chunk, held=(x, b)) == settled
    # a sample that misleads: every sampled block zero, the rest large
    v = torch.randn(n, generator=gen) + 10.0
    starts, block = tv.sample_blocks(n)
    for a in starts:
        v[a : a + block] = 0.0
    k = n // 10
    assert tv._sampled_kths(lambda lo, hi: v[lo:hi], 0, n, [k], chunk) == {}
    assert tv._sampled_kths(lambda lo, hi: v[lo:hi], 0, n, [k], chunk, held=v) == {}
    assert merger_kths(lambda lo, hi: v[lo:hi], n, [k], chunk) == [float(v.abs().kthvalue(n - k + 1).values)]


@pytest.mark.parametrize("chunk", [1 << 22, 100_003])
def test_models_selected_in_one_pass_are_each_exact(chunk):
    """TIES' trims of every model in one pass over the models and the base: each the exact k-th of its own
    |x_j - base| (kthvalue's), a model whose sample misleads found by its histograms, a model with no k skipped."""
    from evolver_kernels.methods import selection as tv

    n = tv.SAMPLED_MIN + 4099
    gen = torch.Generator().manual_seed(6)
    b = torch.randn(n, generator=gen).bfloat16()
    xs = [torch.randn(n, generator=gen).bfloat16() for _ in range(3)]
    starts, block = tv.sample_blocks(n)
    for a in starts:  # model 2's sample misleads: its sampled blocks equal the base, the rest far from it
        xs[2][a : a + block] = b[a : a + block]
    xs[2] = torch.where(xs[2] == b, xs[2], xs[2] + 10.0).bfloat16()
    ks = [n // 3, None, n // 10]
    got = tv.kth_largest_magnitudes_of_models(lambda lo, hi: ([x[lo:hi] for x in xs], b[lo:hi]), 0, n, ks, chunk)
    taus = [(x.float() - b.float()).abs() for x in xs]
    assert got == [float(taus[0].kthvalue(n - ks[0] + 1).values), None, float(taus[2].kthvalue(n - ks[2] + 1).values)]
    with pytest.raises(ValueError, match="k must be in"):
        tv.kth_largest_magnitudes_of_models(lambda lo, hi: ([x[lo:hi] for x in xs], b[lo:hi]), 0, n, [n + 1], chunk)
