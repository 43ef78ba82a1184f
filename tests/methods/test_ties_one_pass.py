"""TIES with its trims found in the merging pass (the CPU extension's ties_window_merge_ op): the same bits as the
selecting pass followed by the merge, on odd sizes, chunked calls and every dtype; where it does not apply (tied
magnitudes, a sample that misleads) the two passes give the tensor, never another answer."""

import pytest
import torch

from evolver_kernels.kernels import backends
from evolver_kernels.kernels.ops import merge_tensors
from evolver_kernels.methods import merger, selection
from evolver_kernels.methods import task_vectors as tv
from evolver_kernels.storage.arena import Arena, Layout
from evolver_kernels.storage.population import MemoryPopulation

pytestmark = pytest.mark.skipif(backends.cpu_extension() is None, reason="the CPU extension is not built")
N = selection.SAMPLED_MIN + 4099  # odd, above the sample's floor


@pytest.fixture(autouse=True)
def _one_pass_wherever_exact(monkeypatch):
    """The one pass wherever it is exact (its gate on the records' share is a matter of cost, not of bits: these
    tensors' windows, a small sample's, hold more than it lets through)."""
    monkeypatch.setattr(tv, "ONE_PASS_RECORDS", 0.5)


def _models(dtype, n=N, models=3, seed=0, step=0.01):
    """A base of scale 0.02 and models `step` away from it (the benchmark's models), one tensor each."""
    gen = torch.Generator().manual_seed(seed)
    b = (torch.randn(n, generator=gen) * 0.02).to(dtype)
    xs = [(b.float() + step * torch.randn(n, generator=gen)).to(dtype) for _ in range(models)]
    return xs, b


def _two_passes(xs, b, ks, weights, scale, normalize, chunk):
    def entry(a, c):
        return [x[a:c] for x in xs], b[a:c]

    trims = selection.kth_largest_magnitudes_of_models(entry, 0, b.numel(), ks, chunk)
    return merge_tensors(xs, base=b, weights=weights, trim=trims, scale=scale, normalize=normalize)


def _one_pass(xs, b, ks, weights, scale, normalize, chunk):
    dst = torch.full_like(b, float("nan"))
    ran = tv._ties_in_one_pass(
        lambda a, c: ([x[a:c] for x in xs], b[a:c]), b.numel(), ks, weights, scale, normalize, chunk, dst, None
    )
    return ran, dst


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [1 << 22, 100_003])
def test_one_pass_gives_the_two_passes_bits(dtype, chunk):
    xs, b = _models(dtype)
    xs[1][::7] = b[::7]  # zeros among model 1's magnitudes
    ks = [N // 3, N // 10, N // 2 + 1]
    for weights, scale, normalize in (([1.0, 0.5, 2.0], 0.8, True), ([1.0, 1.0, 1.0], 1.0, False)):
        ran, got = _one_pass(xs, b, ks, weights, scale, normalize, chunk)
        assert ran
        assert torch.equal(_bits(got), _bits(_two_passes(xs, b, ks, weights, scale, normalize, chunk)))


def test_one_pass_records_only_the_elements_in_a_window():
    """The op: out exact wherever no model's magnitude lies in its window, and exactly those elements recorded."""
    xs, b = _models(torch.bfloat16, n=100_001)
    taus = [(x.float() - b.float()).abs().view(torch.int32) for x in xs]
    windows = [(int(t.kthvalue(60_000).values), int(t.kthvalue(61_000).values)) for t in taus]
    n = len(xs)
    counts = torch.zeros(n, 2, dtype=torch.int64)
    gathered = [torch.empty(5000, dtype=torch.int32) for _ in xs]
    fix_index, fix_count = torch.empty(20_000, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    fix_values = torch.empty(n + 1, 20_000, dtype=torch.bfloat16)
    out = torch.empty_like(b)
    from evolver_kernels.kernels.ties_windows import ties_window_merge

    for lo, hi in ((0, 33_333), (33_333, 100_001)):  # two calls: the indices run on across them
        ties_window_merge(
            [x[lo:hi] for x in xs],
            b[lo:hi],
            weights=[1.0] * n,
            scale=1.0,
            normalize=True,
            windows=windows,
            index_base=lo,
            gathered=gathered,
            counts=counts,
            fix_index=fix_index,
            fix_values=fix_values,
            fix_count=fix_count,
            out=out[lo:hi],
        )
    in_window = [(t >= lo) & (t <= hi) for t, (lo, hi) in zip(taus, windows)]
    some = torch.stack(in_window).any(0)
    r = int(fix_count)
    assert r == int(some.sum())
    order = fix_index[:r].argsort()
    assert torch.equal(fix_index[:r][order], some.nonzero().view(-1))
    for k in range(n):
        assert torch.equal(_bits(fix_values[k, :r][order]), _bits(xs[k][some]))
        assert counts[k].tolist() == [int((taus[k] > windows[k][1]).sum()), int(in_window[k].sum())]
        assert sorted(gathered[k][: int(in_window[k].sum())].tolist()) == sorted(taus[k][in_window[k]].tolist())
    assert torch.equal(_bits(fix_values[n, :r][order]), _bits(b[some]))
    trims = [float(torch.tensor(lo, dtype=torch.int32).view(torch.float32)) for lo, _ in windows]
    want = merge_tensors(xs, base=b, weights=[1.0] * n, trim=trims)
    assert torch.equal(_bits(out[~some]), _bits(want[~some]))


def test_where_it_does_not_apply_the_two_passes_give_the_tensor():
    """Tied magnitudes around a trim (bf16 models one step from the base) and a sample that misleads are refused,
    before or after the pass; ties() then gives the selecting pass's and the merge's tensor."""
    xs, b = _models(torch.bfloat16, step=0.0)
    for x in xs:  # one bf16 step away from the base, or none: a few magnitudes, each held by many elements
        x.copy_(torch.where(torch.rand(N) < 0.5, b.float() * (1 + 2**-7), b.float()).bfloat16())
    ks = [N // 3] * 3
    assert not _one_pass(xs, b, ks, [1.0] * 3, 1.0, True, 1 << 22)[0]
    misled, base = _models(torch.float32)
    starts, block = selection.sample_blocks(N)
    sampled = torch.zeros(N, dtype=torch.bool)
    for a in starts:
        sampled[a : a + block] = True
    for x in misled:  # the sampled blocks as the benchmark's models, the rest ten away from the base
        x.add_(torch.where(sampled, 0.0, 10.0))
    assert not _one_pass(misled, base, ks, [1.0] * 3, 1.0, True, 1 << 22)[0]  # refused after its pass
    for models, ancestor in ((xs, b), (misled, base)):
        layout = Layout.from_params([(("w",), ancestor.dtype, (N,))])
        pop = MemoryPopulation(layout, 3, "cpu")
        for arena, x in zip(pop.arenas, models):
            arena.view(layout.entries[0]).copy_(x)
        b_arena = Arena.empty(layout)
        b_arena.view(layout.entries[0]).copy_(ancestor)
        got = merger.ties(pop, b_arena, Arena.empty(layout), density=0.25).view(layout.entries[0])
        want = _two_passes(models, ancestor, [int(0.25 * N)] * 3, [1.0] * 3, 1.0, True, 1 << 22)
        assert torch.equal(_bits(got), _bits(want))


def test_ties_takes_the_one_pass_on_the_cpu_and_the_two_elsewhere():
    """merger.ties on a tensor above the sample's floor: the CPU extension's one pass and the reference backend's
    two passes give the same bits."""
    layout = Layout.from_params([(("w",), torch.bfloat16, (N,)), (("v",), torch.bfloat16, (7, 5))])
    w, v = sorted(layout.entries, key=lambda e: e.name, reverse=True)
    pop = MemoryPopulation(layout, 3, "cpu")
    xs, b = _models(torch.bfloat16)
    for arena, x in zip(pop.arenas, xs):
        arena.view(w).copy_(x)
        arena.view(v).copy_(torch.randn(7, 5))
    base = Arena.empty(layout)
    base.view(w).copy_(b)
    outs = [merger.ties(pop, base, Arena.empty(layout), density=0.3, backend=be) for be in ("cpu", "reference")]
    assert torch.equal(_bits(outs[0].buffers["bfloat16"]), _bits(outs[1].buffers["bfloat16"]))


def test_more_models_than_measured_take_the_two_passes():
    xs, b = _models(torch.float32, models=tv.ONE_PASS_MODELS + 1)
    assert not _one_pass(xs, b, [N // 3] * len(xs), [1.0] * len(xs), 1.0, True, 1 << 22)[0]


def test_the_op_refuses_a_window_that_is_not_one():
    xs, b = _models(torch.float32, n=1000)
    with pytest.raises(RuntimeError, match="is not a range of non-negative fp32 bits"):
        torch.ops.evolver_kernels.ties_window_merge_(
            xs,
            b,
            [1.0] * 3,
            [1.0] * 3,
            1.0,
            True,
            [5, 0, 0],
            [4, 1, 1],
            0,
            [torch.empty(1, dtype=torch.int32)] * 3,
            torch.zeros(3, 2, dtype=torch.int64),
            torch.empty(1, dtype=torch.int64),
            torch.empty(4, 1),
            torch.zeros(1, dtype=torch.int64),
            torch.empty(1000),
        )


def test_an_output_that_is_an_input_takes_the_two_passes():
    """Merged into one of its inputs (allowed, as merge_tensors allows it), TIES does not take the one pass: one
    that failed after it would have overwritten the input the two passes then read."""
    xs, b = _models(torch.float32)
    assert not tv._ties_in_one_pass(
        lambda a, c: ([x[a:c] for x in xs], b[a:c]), N, [N // 3] * 3, [1.0] * 3, 1.0, True, 1 << 22, xs[0], None
    )
    assert torch.equal(_bits(xs[0]), _bits(_models(torch.float32)[0][0]))  # untouched
