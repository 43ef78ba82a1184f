"""The fused merge (evolver_kernels.merge_tensors) against its contract (reference.merge_reference) on every
backend: each mode (average, Fisher weights, task arithmetic, TIES, DARE on both, breadcrumbs' magnitude band,
sce's variance selection with its election and divisor floor, della's per-element drops; nearswap), every
dtype, odd sizes, chunked calls, in place; the contract against plain stacking formulas; bad arguments."""

import math

import pytest
import torch
from _util import assert_bitwise_equal
from conftest import KERNEL_CASES

import evolver_kernels as ek
from evolver_kernels.kernels.reference import crossover_mask_reference, merge_reference, nearswap_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MODES = {
    "average": dict(weights=[1.0, 2.0, 0.5, 1.5]),
    "fisher": dict(weights=[1.0, 2.0, 0.5, 1.5], fisher=True),
    "task_arithmetic": dict(base=True, normalize=False, scale=0.7),
    "ties": dict(base=True, trim=[0.1, 0.3, 0.0, 0.2], weights=[1.0, 0.5, 2.0, 1.0]),
    "dare_linear": dict(base=True, normalize=False, drop_p=0.3),
    "dare_ties": dict(base=True, trim=[0.1, 0.3, 0.0, 0.2], drop_p=0.6, scale=0.9),
    # breadcrumbs: a magnitude band per model (inf: nothing kept), with and without the election
    "breadcrumbs": dict(
        base=True,
        trim=[0.1, 0.0, 0.2, math.inf],
        top=[0.6, 0.5, math.inf, math.inf],
        elect=False,
        normalize=False,
        weights=[1.0, 0.5, 2.0, 1.0],
        scale=0.8,
    ),
    "breadcrumbs_ties": dict(
        base=True, trim=[0.1, 0.0, 0.2, 0.05], top=[0.6, 0.5, math.inf, 0.9], elect=True, normalize=False
    ),
    # sce: variance selection, the sign elected on the unweighted task vectors, a floor under the divisor
    "sce": dict(
        base=True, select=0.15, elect=True, elect_weights=[1.0] * 4, weights=[0.4, 0.1, 0.3, 0.2], min_den=0.25
    ),
    "select_fisher": dict(select=0.1, fisher=True, weights=[1.0, 2.0, 0.5, 1.5]),
    "dare_top": dict(base=True, top=[0.5, 0.7, 0.3, 0.9], drop_p=0.4, normalize=False),
    # della: per-element drop thresholds (None: that model keeps everything), survivors rescaled per model
    "della": dict(
        base=True,
        drop_thresholds=[True, False, True, True],
        drop_rescales=[1.5, 1.0, 0.8, 2.0],
        elect=True,
        weights=[1.0, 0.5, 2.0, 1.0],
    ),
    "della_linear": dict(base=True, drop_thresholds=[True] * 4, normalize=False, scale=0.7),
}


def _inputs(n, dtype, device, mode, seed=0, count=4):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen)
    xs = [(base + 0.4 * torch.randn(n, generator=gen)).to(dtype).to(device) for _ in range(count)]
    kw = dict(MODES[mode])
    kw["base"] = base.to(dtype).to(device) if kw.get("base") else None
    if kw.pop("fisher", False):
        kw["fisher"] = [torch.rand(n, generator=gen).to(device) for _ in range(count)]
    if "drop_thresholds" in kw:  # keep probabilities spread over (0, 1), the ends 0 and 2**32 included
        thresholds = []
        for flag in kw["drop_thresholds"]:
            t = torch.randint(0, 2**32 + 1, (n,), generator=gen, dtype=torch.int64)
            t[:2], t[-2:] = 0, 2**32
            thresholds.append(t.to(device) if flag else None)
        kw["drop_thresholds"] = thresholds
    return xs, kw


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 7, 4099, 100_003])
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_reference_bitwise(device, backend, dtype, numel, mode):
    xs, kw = _inputs(numel, dtype, device, mode, seed=numel)
    stream_kw = dict(seed=2**63 + 5, stream=2**32 - 2, offset=numel % 7)  # model k's stream crosses 2**32
    want = merge_reference(xs, **{"weights": [1.0] * 4, **kw}, **stream_kw)
    got = ek.merge_tensors(xs, backend=backend, **kw, **stream_kw)
    assert_bitwise_equal(got, want, f"{backend} {mode} {dtype}")


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 4099, 100_003])
@pytest.mark.parametrize("t", [0.3, -0.5, 1e-7])
def test_nearswap_matches_reference_bitwise(device, backend, dtype, numel, t):
    gen = torch.Generator().manual_seed(numel)
    base = torch.randn(numel, generator=gen)
    x = base + 0.4 * torch.randn(numel, generator=gen)
    x[: numel // 3] = base[: numel // 3]  # |base - x| = 0: the 1e-6 floor
    x, base = x.to(dtype).to(device), base.to(dtype).to(device)
    want = nearswap_reference(x, base, t)
    got = ek.merge_tensors([x], base=base, nearswap_t=t, backend=backend)
    assert_bitwise_equal(got, want, f"{backend} nearswap {dtype} t={t}")
    if t == 0.3 and numel > 1:  # not vacuous: some elements swapped in, others moved less than half-way
        w = ((got.double() - base.double()) / (x.double() - base.double())).nan_to_num(1.0)
        assert (w > 0.99).any() and (w < 0.4).any()


@pytest.mark.parametrize("device,backend", KERNEL_CASES + [pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("mode", ["average", "dare_ties", "della"])
def test_chunked_calls_equal_one_call(device, backend, mode):
    n = 20_011
    xs, kw = _inputs(n, torch.bfloat16, device, mode, seed=3)
    offset = 2**32 - 7_000
    whole = ek.merge_tensors(xs, backend=backend, seed=9, offset=offset, **kw)
    out = torch.empty_like(xs[0])
    cuts = [0, 5, 4096, 4099, 13_000, n]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        part = dict(kw)
        part["base"] = kw["base"][lo:hi] if kw["base"] is not None else None
        if kw.get("fisher"):
            part["fisher"] = [f[lo:hi] for f in kw["fisher"]]
        if kw.get("drop_thresholds"):
            part["drop_thresholds"] = [None if t is None else t[lo:hi] for t in kw["drop_thresholds"]]
        ek.merge_tensors([x[lo:hi] for x in xs], backend=backend, seed=9, offset=offset + lo, out=out[lo:hi], **part)
    assert_bitwise_equal(out, whole, f"{backend} chunked")


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_in_place_and_many_models(device, backend):
    n, count = 3001, 40
    xs, kw = _inputs(n, torch.float32, device, "dare_ties", count=count)
    kw["trim"] = [0.05 * (k % 5) for k in range(count)]
    want = merge_reference(xs, weights=[1.0] * count, **kw)
    ek.merge_tensors(xs, backend=backend, out=xs[3], **kw)
    assert_bitwise_equal(xs[3], want, "out is xs[3]")


def test_contract_against_stacking_formulas():
    """The contract is the usual formulas: weighted mean, base + scale * sum of task vectors, DARE's drop and
    rescale, TIES' elected sign and mean over the agreeing models."""
    n = 10_000
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(n, generator=gen, dtype=torch.float64)
    xs = [base + torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(3)]
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).view(-1, 1)
    x32 = [x.float() for x in xs]
    stacked = torch.stack(xs)
    got = merge_reference(x32, weights=[1, 2, 3])
    torch.testing.assert_close(got.double(), (w * stacked).sum(0) / 6, rtol=1e-6, atol=1e-6)
    got = merge_reference(x32, weights=[1, 2, 3], base=base.float(), normalize=False, scale=0.5)
    torch.testing.assert_close(got.double(), base + 0.5 * (w * (stacked - base)).sum(0), rtol=1e-5, atol=1e-5)
    drops = torch.stack([crossover_mask_reference(n, CR=0.25, seed=4, stream=10 + k) for k in range(3)])
    got = merge_reference(x32, weights=[1, 2, 3], base=base.float(), normalize=False, drop_p=0.25, seed=4, stream=10)
    tau = torch.where(drops, 0.0, stacked - base) / 0.75
    torch.testing.assert_close(got.double(), base + (w * tau).sum(0), rtol=1e-5, atol=1e-5)
    assert 0.22 < drops.double().mean() < 0.28
    got = merge_reference(x32, weights=[1, 2, 3], base=base.float(), trim=[0.5, 0.5, 0.5])
    tau = (stacked - base) * ((stacked - base).abs() >= 0.5)
    d = w * tau
    sign = torch.where(d.sum(0) >= 0, 1.0, -1.0)
    agree = d.sign() == sign
    want = base + (d * agree).sum(0) / (w * agree).sum(0).where((w * agree).sum(0) != 0, torch.ones(1)) * (agree.any(0))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # breadcrumbs: each task vector cut to the band 0.5 <= |tau| < 1.5 (about 48% of it), then summed
    tau = stacked - base
    band = (tau.abs() >= 0.5) & (tau.abs() < 1.5)
    assert 0.4 < band.double().mean() < 0.55
    got = merge_reference(
        x32, weights=[1, 2, 3], base=base.float(), trim=[0.5] * 3, top=[1.5] * 3, elect=False, normalize=False
    )
    torch.testing.assert_close(got.double(), base + (w * tau * band).sum(0), rtol=1e-5, atol=1e-5)
    # sce: the elements whose task vectors vary most (torch.var over the models), the sign of their plain sum,
    # the c-weighted mean of the agreeing, the divisor at least 0.25
    var = torch.var(tau, dim=0, unbiased=False)
    keep = var >= 1.0
    assert 0.2 < keep.double().mean() < 0.8
    sel = tau * keep
    agree = (sel.sign() == torch.where(sel.sum(0) >= 0, 1.0, -1.0)) & (sel != 0)
    c = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).view(-1, 1)
    want = base + (c * sel * agree).sum(0) / (c * agree).sum(0).clamp(min=0.25)
    got = merge_reference(
        x32, weights=[0.5, 0.3, 0.2], base=base.float(), select=1.0, elect=True, elect_weights=[1.0] * 3, min_den=0.25
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(
        got, merge_reference(x32, weights=[0.5, 0.3, 0.2], base=base.float(), select=1.0, elect=True, min_den=0.25)
    )  # the election's weights matter


def test_bad_arguments():
    x = torch.zeros(8)
    with pytest.raises(ValueError, match="xs must be a list of 1 to 64"):
        ek.merge_tensors([x] * 65)
    with pytest.raises(ValueError, match="xs must be a list"):
        ek.merge_tensors([])
    with pytest.raises(ValueError, match=r"xs\[1\] has shape"):
        ek.merge_tensors([x, torch.zeros(9)])
    with pytest.raises(TypeError, match=r"xs\[1\] has dtype"):
        ek.merge_tensors([x, x.bfloat16()])
    with pytest.raises(ValueError, match="weights must be a list of 2"):
        ek.merge_tensors([x, x], weights=[1.0])
    with pytest.raises(ValueError, match=r"weights\[1\] must be finite"):
        ek.merge_tensors([x, x], weights=[1.0, math.inf])
    with pytest.raises(ValueError, match=r"trim\[0\] must be >= 0"):
        ek.merge_tensors([x, x], base=x, trim=[-1.0, 0.0])
    with pytest.raises(ValueError, match="drop_p must be in"):
        ek.merge_tensors([x, x], base=x, drop_p=1.0)
    with pytest.raises(ValueError, match="give base"):
        ek.merge_tensors([x, x], drop_p=0.5)
    with pytest.raises(ValueError, match="fisher and TIES"):
        ek.merge_tensors([x, x], base=x, trim=[0, 0], fisher=[x, x])
    with pytest.raises(ValueError, match=r"top\[1\] must be >= 0"):
        ek.merge_tensors([x, x], base=x, top=[1.0, -1.0])
    with pytest.raises(ValueError, match="elect_weights is the weights of TIES"):
        ek.merge_tensors([x, x], base=x, elect_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="select must be a variance"):
        ek.merge_tensors([x, x], select=math.nan)
    with pytest.raises(ValueError, match="min_den must be finite"):
        ek.merge_tensors([x, x], min_den=-1.0)
    with pytest.raises(ValueError, match=r"nearswap_t merges exactly one model into base .*\(got 2 models\)"):
        ek.merge_tensors([x, x], base=x, nearswap_t=0.5)
    with pytest.raises(ValueError, match=r"takes no other option \(got weights, drop_p\)"):
        ek.merge_tensors([x], base=x, nearswap_t=0.5, weights=[2.0], drop_p=0.5)
    with pytest.raises(ValueError, match="drop_p and drop_thresholds cannot be combined"):
        ek.merge_tensors([x, x], base=x, drop_p=0.5, drop_thresholds=[None, None])
    with pytest.raises(TypeError, match=r"drop_thresholds\[1\] must be an int64 tensor"):
        ek.merge_tensors([x, x], base=x, drop_thresholds=[None, x])
    with pytest.raises(ValueError, match="drop_rescales scales the survivors"):
        ek.merge_tensors([x, x], base=x, drop_rescales=[1.0, 2.0])
    with pytest.raises(ValueError, match="nearswap_t must be finite"):
        ek.merge_tensors([x], base=x, nearswap_t=math.inf)
    with pytest.raises(TypeError, match=r"fisher\[1\] must be a float32"):
        ek.merge_tensors([x, x], fisher=[x, x.half()])
    with pytest.raises(ValueError, match="out partly overlaps"):
        buf = torch.zeros(9)
        ek.merge_tensors([buf[:8], x], out=buf[1:])
    with pytest.raises(ValueError, match="stream"):
        ek.merge_tensors([x, x], stream=2**62 - 1)
