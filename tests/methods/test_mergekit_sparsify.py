"""breadcrumbs, breadcrumbs_ties, nearswap and sce against mergekit itself; della and della_linear against a
full-tensor reference of their formula with our Philox mask (mergekit draws with torch.bernoulli), plus the
statistical agreement of the keep rate with mergekit's; all six through the Python API in chunks smaller than a
tensor and than a row, against straightforward full-tensor references.

mergekit runs every case's YAML in one subprocess (its import dominates the time); our CLI merges the same
YAML, and the same merge given by flags; every tensor is compared. Each comparison is checked not to be
vacuous: the merge is far (1e-4, 100x the tolerance) from every input, from their average and from the merge
without the method's own step (plain task arithmetic, TIES without the band, the base)."""

import json
import os

import pytest
import torch
import yaml
from _util import (
    MERGEKIT_ATOL,
    MERGEKIT_RTOL,
    assert_bitwise_equal,
    assert_same_as_mergekit,
    merge_cli_error,
    random_population,
    run_mergekit,
)
from safetensors.torch import load_file

from evolver_kernels import available_backends, methods
from evolver_kernels.io import model_io
from evolver_kernels.kernels import drop_bits, ranks, rescale
from evolver_kernels.kernels.rng import STREAM_DARE, random_words
from evolver_kernels.merge import main
from evolver_kernels.methods.della import della_kept
from evolver_kernels.methods.merger import Merger
from evolver_kernels.storage.arena import Arena, Layout
from evolver_kernels.storage.population import MemoryPopulation

RTOL, ATOL = MERGEKIT_RTOL, MERGEKIT_ATOL
FAR = 1e-4


def _weights(paths, ws, **per_model):
    return [
        {"model": p, "parameters": {"weight": w, **{k: v[i] for k, v in per_model.items()}}}
        for i, (p, w) in enumerate(zip(paths, ws))
    ]


def _cases(base, m):
    """name: (mergekit YAML without dtype, our flags, what the merge must be far from: "task_arithmetic",
    "ties" (both with the case's weights and lambda), or model paths)."""
    w = ["1", "0.5", "2"]
    return {
        "breadcrumbs": (
            {
                "merge_method": "breadcrumbs",
                "base_model": base,
                "models": _weights(m, (1.0, 0.5, 2.0), density=(0.5, 0.7, 0.4)),
                "parameters": {"gamma": 0.05, "lambda": 0.8},
            },
            [
                "--method",
                "breadcrumbs",
                "--base",
                base,
                "--models",
                *m,
                "--weights",
                *w,
                "--density",
                "0.5",
                "0.7",
                "0.4",
                "--gamma",
                "0.05",
                "--scale",
                "0.8",
            ],
            ["task_arithmetic"],
        ),
        "breadcrumbs_ties": (
            {
                "merge_method": "breadcrumbs_ties",
                "base_model": base,
                "models": _weights(m, (1.0, 0.5, 2.0), gamma=(0.02, 0.1, 0.05)),
                "parameters": {"density": 0.6},
            },
            [
                "--method",
                "breadcrumbs_ties",
                "--base",
                base,
                "--models",
                *m,
                "--weights",
                *w,
                "--density",
                "0.6",
                "--gamma",
                "0.02",
                "0.1",
                "0.05",
            ],
            ["task_arithmetic", "ties"],
        ),
        # weight 1 each, density and gamma given per model (the config of issue #28 that came out 1.8% away)
        "breadcrumbs_per_model": (
            {
                "merge_method": "breadcrumbs",
                "base_model": base,
                "models": _weights(m, (1.0, 1.0, 1.0), density=(0.7,) * 3, gamma=(0.05,) * 3),
            },
            ["--method", "breadcrumbs", "--base", base, "--models", *m, "--density", "0.7", "--gamma", "0.05"],
            ["task_arithmetic"],
        ),
        # gamma + density > 1: mergekit drops fewer outliers and keeps the smallest `density`
        "breadcrumbs_ties_low": (
            {
                "merge_method": "breadcrumbs_ties",
                "base_model": base,
                "models": _weights(m, (1.0, 1.0, 1.0)),
                "parameters": {"density": 0.7, "gamma": 0.5},
            },
            ["--method", "breadcrumbs_ties", "--base", base, "--models", *m, "--density", "0.7", "--gamma", "0.5"],
            ["task_arithmetic", "ties"],
        ),
        # the base listed among the models is the base (mergekit's non-base input is the other one)
        "nearswap": (
            {
                "merge_method": "nearswap",
                "base_model": base,
                "models": [{"model": base}, {"model": m[0]}],
                "parameters": {"t": 0.02},
            },
            ["--method", "nearswap", "--base", base, "--models", m[0], "--t", "0.02"],
            [base, m[0]],
        ),
        "sce": (
            {
                "merge_method": "sce",
                "base_model": base,
                "models": [{"model": p} for p in m],
                "parameters": {"select_topk": 0.4},
            },
            ["--method", "sce", "--base", base, "--models", *m, "--select-topk", "0.4"],
            ["ties"],
        ),
        "sce_all": (
            {"merge_method": "sce", "base_model": base, "models": [{"model": p} for p in m]},
            ["--method", "sce", "--base", base, "--models", *m],
            ["ties"],
        ),
    }


CASE_WEIGHTS = {"breadcrumbs": ((1.0, 0.5, 2.0), 0.8), "breadcrumbs_ties": ((1.0, 0.5, 2.0), 1.0)}


def _load(path):
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def merged(llama_pop, tmp_path_factory):
    """{case: (ours from the YAML, ours from flags, mergekit's)}."""
    root = tmp_path_factory.mktemp("mergekit-sparsify")
    cases = _cases(llama_pop.base, llama_pop.models)
    run_mergekit(root, {name: {**config, "dtype": "float32"} for name, (config, _, _) in cases.items()})
    out = {}
    for name, (_, flags, _) in cases.items():
        assert main(["--config", str(root / f"{name}.yml"), "--out", str(root / f"{name}-yaml")]) == 0
        assert main([*flags, "--out", str(root / f"{name}-flags")]) == 0
        out[name] = tuple(_load(str(root / f"{name}-{kind}")) for kind in ("yaml", "flags", "mergekit"))
    return out


def _far_from(what, llama_pop, case, keys):
    """The tensors a merge must be far from: a model, or the plain task-arithmetic / TIES merge of the models."""
    if what not in ("task_arithmetic", "ties"):
        return _load(what)
    base = _load(llama_pop.base)
    models = [_load(p) for p in llama_pop.models]
    ws, lam = CASE_WEIGHTS.get(case, ((1.0, 1.0, 1.0), 1.0))
    out = {}
    for k in keys:
        ds = [w * (m[k] - base[k]) for w, m in zip(ws, models)]
        if what == "task_arithmetic":
            out[k] = base[k] + lam * sum(ds)
        else:
            positive = sum(ds) >= 0
            out[k] = base[k] + lam * sum(torch.where(positive, d > 0, d < 0) * d for d in ds)
    return out


CASE_NAMES = list(_cases("b", ["m0", "m1", "m2"]))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_same_tensors_as_mergekit(merged, llama_pop, case):
    from_yaml, from_flags, theirs = merged[case]
    assert_same_as_mergekit(case, from_yaml, from_flags, theirs)
    # not vacuous: far from every input, from their average, and from the merge without the method's own step
    models = [_load(p) for p in llama_pop.models]
    others = [{k: sum(m[k] for m in models) / len(models) for k in theirs}] + models
    others += [_far_from(what, llama_pop, case, theirs) for what in _cases(llama_pop.base, llama_pop.models)[case][2]]
    for other in others:
        assert max((theirs[k] - other[k]).abs().max().item() for k in theirs) > FAR, case


# -- della: the CLI against the formula with our Philox mask, tensor by tensor --------------------------------


def _ref_kept(tau, density, epsilon, seed, stream, offset):
    """della's keep decisions written out: ranks by a stable double argsort, p in fp64, the Philox words."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1, stable=True)
    c = rows.shape[1]
    rank_norm = ranks.double() / (c - 1) if c > 1 else torch.full(rows.shape, 0.5, dtype=torch.float64)
    p = (density - epsilon) + rank_norm * (2 * epsilon)
    words = random_words(rows.numel(), seed=seed, stream=stream, offset=offset).view(rows.shape)
    return (words >= torch.floor((1 - p) * 2.0**32).long()).reshape(tau.shape)


def _ref_della(base, xs, weights, densities, epsilons, lam, seed, offset, ties, rescale=True, normalize=None):
    """out of one tensor in fp64 from fp32 task vectors (as both tools form them); normalize (default: ties)
    divides by the weights of the agreeing models (ties) or by all the weights (linear)."""
    normalize = ties if normalize is None else normalize
    ds = []
    for k, (x, w) in enumerate(zip(xs, weights)):
        tau = x.float() - base.float()
        if densities[k] < 1:
            kept = _ref_kept(tau, densities[k], epsilons[k], seed, STREAM_DARE + k, offset)
            masked = torch.where(kept, tau.double(), 0.0)
            before, after = tau.double().abs().sum(), masked.abs().sum()
            factor = before / after if rescale and before >= 1e-7 and after >= 1e-7 else 1.0
            tau = masked * factor
        ds.append(w * tau.double())
    if not ties:
        return base.double() + lam * sum(ds) / (sum(weights) if normalize else 1.0)
    positive = sum(ds) >= 0
    agree = [torch.where(positive, d > 0, d < 0) for d in ds]
    y = sum(torch.where(a, d, 0.0) for a, d in zip(agree, ds))
    den = sum(a.double() * w for a, w in zip(agree, weights))
    return base.double() + lam * (y / torch.where(den == 0, 1.0, den) if normalize else y)


DELLA_CASES = {
    "della": (
        {
            "merge_method": "della",
            "base_model": "{base}",
            "models": "{weighted}",
            "parameters": {"epsilon": 0.1, "lambda": 0.9, "seed": 7},
        },
        dict(weights=(1.0, 0.5, 2.0), densities=(0.5, 0.7, 0.3), epsilons=(0.1,) * 3, lam=0.9, seed=7, ties=True),
    ),
    "della_linear": (
        {
            "merge_method": "della_linear",
            "base_model": "{base}",
            "models": "{plain}",
            "parameters": {"density": 0.4, "epsilon": [{"filter": "mlp", "value": 0.2}, {"value": 0.05}]},
        },
        dict(weights=(1.0, 1.0, 1.0), densities=(0.4,) * 3, epsilons=None, lam=1.0, seed=0, ties=False),
    ),
    # mergekit's dare methods: bernoulli drops keeping `density`, L1 rescale, normalize false unless given
    "mergekit_dare_ties": (
        {
            "merge_method": "dare_ties",
            "base_model": "{base}",
            "models": "{weighted}",
            "parameters": {"lambda": 0.9, "seed": 7, "int8_mask": True},
        },
        dict(
            weights=(1.0, 0.5, 2.0),
            densities=(0.5, 0.7, 0.3),
            epsilons=(0.0,) * 3,
            lam=0.9,
            seed=7,
            ties=True,
            normalize=False,
            method="della",
        ),
    ),
    "mergekit_dare_linear": (
        {
            "merge_method": "dare_linear",
            "base_model": "{base}",
            "models": "{plain}",
            "parameters": {"density": 0.4, "normalize": True, "rescale": False},
        },
        dict(
            weights=(1.0, 1.0, 1.0),
            densities=(0.4,) * 3,
            epsilons=(0.0,) * 3,
            lam=1.0,
            seed=0,
            ties=False,
            normalize=True,
            rescale=False,
            method="della_linear",
        ),
    ),
}


@pytest.mark.parametrize("case", list(DELLA_CASES))
def test_della_equals_its_formula_with_our_mask(llama_pop, tmp_path, case):
    raw, p = DELLA_CASES[case]
    base, m = llama_pop.base, llama_pop.models
    models = {
        "{weighted}": [
            {"model": path, "parameters": {"weight": w, "density": d}}
            for path, w, d in zip(m, p["weights"], p["densities"])
        ],
        "{plain}": [{"model": path} for path in m],
    }
    config = {**raw, "base_model": base, "models": models[raw["models"]], "dtype": "float32"}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    assert main(["--config", str(tmp_path / "c.yml"), "--out", str(tmp_path / "o")]) == 0
    ours = _load(str(tmp_path / "o"))
    b, xs = _load(base), [_load(path) for path in m]
    layout = Layout.of_model(model_io.empty_model(model_io.load_config(m[0]), "auto"))
    checked = 0
    for e in layout.entries:
        name = next(a for a in e.aliases if a in ours)
        offset = layout.groups[e.group][0] + e.offset
        epsilons = p["epsilons"] or ((0.2 if "mlp" in name else 0.05),) * 3
        want = _ref_della(
            b[name],
            [x[name] for x in xs],
            p["weights"],
            p["densities"],
            epsilons,
            p["lam"],
            p["seed"],
            offset,
            p["ties"],
            p.get("rescale", True),
            p.get("normalize"),
        )
        torch.testing.assert_close(ours[name].double(), want, rtol=RTOL, atol=ATOL, msg=lambda s, n=name: f"{n}: {s}")
        plain = b[name].double() + p["lam"] * sum(
            w * (x[name].double() - b[name].double()) for w, x in zip(p["weights"], xs)
        )
        assert (ours[name].double() - plain).abs().max() > FAR  # the drops changed it
        checked += 1
    assert checked == len(ours)
    record = json.loads((tmp_path / "o" / "merge.json").read_text())
    assert record["method"] == p.get("method", raw["merge_method"])
    assert record["mergekit_method"] == (raw["merge_method"] if "method" in p else None)


def test_della_keep_rate_agrees_with_mergekits_formula():
    """Keep rates by magnitude decile of a row: ours (Philox) and mergekit's della_magprune (torch.bernoulli)
    both follow p = density - epsilon + 2 epsilon rank / (C - 1), within 5 sigma of 3277 draws per decile."""
    from mergekit.sparsify import della_magprune

    density, epsilon = 0.4, 0.15
    gen = torch.Generator().manual_seed(3)
    tau = torch.randn(32, 1024, generator=gen)
    ours = della_kept(tau, density, epsilon, seed=11, stream=STREAM_DARE, offset=12345)
    torch.manual_seed(5)
    theirs = della_magprune(tau, density, epsilon) != 0
    ranks = torch.argsort(torch.argsort(tau.abs(), dim=1), dim=1).double()
    decile = (ranks * 10 / tau.shape[1]).long()
    for d in range(10):
        where = decile == d
        expected = float((density - epsilon + 2 * epsilon * ranks[where] / (tau.shape[1] - 1)).mean())
        sigma = (expected * (1 - expected) / int(where.sum())) ** 0.5
        for got in (ours, theirs):
            assert abs(float(got[where].double().mean()) - expected) < 5 * sigma, (d, expected)
    assert abs(float(ours.double().mean()) - density) < 5 * (density * (1 - density) / tau.numel()) ** 0.5
    # reproducible, and the same drops as DARE's where epsilon is 0 (drop_p = 1 - density)
    small = tau[:4, :100]
    assert torch.equal(ours[:1], della_kept(tau[:1], density, epsilon, seed=11, stream=STREAM_DARE, offset=12345))
    dare = random_words(small.numel(), seed=11, stream=STREAM_DARE, offset=99) < int((1 - density) * 2**32)
    assert torch.equal(della_kept(small, density, 0.0, seed=11, stream=STREAM_DARE, offset=99).view(-1), ~dare)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "della", "--density", "0.2", "--epsilon", "0.3"], "density +/- epsilon is in (0, 1)"),
        (["--method", "nearswap", "--models", "{m0}", "{m1}"], "nearswap merges exactly 1 model, got 2"),
        (["--method", "sce", "--weights", "1", "2"], "--weights does not apply to sce"),
        (["--method", "breadcrumbs", "--gamma", "1.5"], "--gamma must be in [0, 1]"),
        (["--method", "sce", "--select-topk", "-0.1"], "--select-topk must be in [0, 1]"),
        (["--method", "breadcrumbs", "--epsilon", "0.1"], "--epsilon does not apply to breadcrumbs"),
    ],
)
def test_flag_errors(llama_pop, tmp_path, capsys, argv, message):
    assert message in merge_cli_error(llama_pop, tmp_path / "o", capsys, argv)


def test_evolve_choices():
    evolvable = methods.names(evolvable=True)
    assert {"breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce"} <= set(evolvable)
    assert "nearswap" not in evolvable and methods.get("nearswap").evolve_refusal


# -- the Python API in chunks smaller than a tensor and than a row, against full-tensor references -------------

SHAPES = {"a": (7, 13), "b": (5,), "c": (5, 2, 7), "d": (11, 6), "e": (3, 1)}


def _population(n, seed=0, shapes=SHAPES):
    return random_population(shapes, n, seed)


def _ref_band(tau, density, gamma):
    """mergekit's magnitude_outliers (tie-free data)."""
    if density >= 1:
        return tau
    n = tau.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.argsort(tau.abs().reshape(-1))[bottom : bottom + keep]] = True
    return torch.where(mask.view(tau.shape), tau, 0.0)


def _ref_breadcrumbs(base, xs, w, densities, gammas, lam, ties):
    ds = [wk * _ref_band(x.float() - base.float(), d, g).double() for x, wk, d, g in zip(xs, w, densities, gammas)]
    if ties:
        positive = sum(ds) >= 0
        ds = [torch.where(torch.where(positive, d > 0, d < 0), d, 0.0) for d in ds]
    return base.double() + lam * sum(ds)


def _ref_sce(base, xs, topk):
    taus = torch.stack([x.float() - base.float() for x in xs])
    if topk < 1:
        var = torch.var(taus, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * topk)
        mask = torch.zeros(var.numel(), dtype=torch.bool)
        if k:
            mask[torch.topk(var.reshape(-1), k).indices] = True
        taus = taus * mask.view(var.shape)
    taus = taus.double()
    ms = taus.square().reshape(len(xs), -1).mean(1)
    c = ms / ms.sum() if ms.sum() >= 1e-6 else torch.full_like(ms, 1 / len(xs))
    c = c.view(-1, *([1] * (taus.dim() - 1)))
    positive = taus.sum(0) >= 0
    agree = torch.where(positive, taus > 0, taus < 0)
    return base.double() + (taus * c * agree).sum(0) / (c * agree).sum(0).clamp(min=1e-6)


def _ref_nearswap(base, x, t):
    a, b = base.double(), x.double()
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * b + (1 - weight) * a


API_CASES = {
    # name: (models, Merger kwargs, reference(base, xs, offset))
    "breadcrumbs": (
        3,
        dict(weights=[1.0, 0.5, 2.0], density=[0.5, 0.7, 0.4], gamma=0.1, scale=0.8),
        lambda b, xs, o: _ref_breadcrumbs(b, xs, (1.0, 0.5, 2.0), (0.5, 0.7, 0.4), (0.1,) * 3, 0.8, False),
    ),
    "breadcrumbs_ties": (
        3,
        dict(density=0.6, gamma=[0.0, 0.2, 0.1]),
        lambda b, xs, o: _ref_breadcrumbs(b, xs, (1.0,) * 3, (0.6,) * 3, (0.0, 0.2, 0.1), 1.0, True),
    ),
    # no upper bound anywhere: the fused operator's TIES with the lower bounds as trims
    "breadcrumbs_ties_fused": (
        3,
        dict(density=[0.5, 1.0, 0.3], gamma=0.0, weights=[2.0, 1.0, 1.0]),
        lambda b, xs, o: _ref_breadcrumbs(b, xs, (2.0, 1.0, 1.0), (0.5, 1.0, 0.3), (0.0,) * 3, 1.0, True),
    ),
    "della": (
        3,
        dict(density=[0.5, 0.6, 0.4], epsilon=0.2, weights=[1.0, 2.0, 0.5], seed=5),
        lambda b, xs, o: _ref_della(b, xs, (1.0, 2.0, 0.5), (0.5, 0.6, 0.4), (0.2,) * 3, 1.0, 5, o, True),
    ),
    "della_linear": (
        3,
        dict(density=0.5, epsilon=[0.1, 0.3, 0.0], scale=1.5, rescale=False),
        lambda b, xs, o: _ref_della(b, xs, (1.0,) * 3, (0.5,) * 3, (0.1, 0.3, 0.0), 1.5, 0, o, False, rescale=False),
    ),
    # epsilon 0 (mergekit's dare): no ranks, so any tensor, 3-d included, in chunks that split rows
    "della_flat": (
        3,
        dict(density=[0.5, 0.7, 0.3], epsilon=0.0, weights=[1.0, 0.5, 2.0], normalize=False, seed=3),
        lambda b, xs, o: _ref_della(
            b, xs, (1.0, 0.5, 2.0), (0.5, 0.7, 0.3), (0.0,) * 3, 1.0, 3, o, True, normalize=False
        ),
    ),
    "sce": (4, dict(select_topk=0.3), lambda b, xs, o: _ref_sce(b, xs, 0.3)),
    "sce_all": (3, dict(), lambda b, xs, o: _ref_sce(b, xs, 1.0)),
    "nearswap": (1, dict(t=0.2), lambda b, xs, o: _ref_nearswap(b, xs[0], 0.2)),
}
DELLA_SHAPES = {k: s for k, s in SHAPES.items() if len(s) <= 2}  # della ranks rows of matrices and vectors


def _method_and_shapes(case):
    method = case.removesuffix("_all").removesuffix("_fused").removesuffix("_flat")
    return method, DELLA_SHAPES if case in ("della", "della_linear") else SHAPES


@pytest.mark.parametrize("case", list(API_CASES))
@pytest.mark.parametrize("chunk", [5, 16, 1 << 20])
def test_streamed_merge_equals_full_tensor_reference(case, chunk):
    """chunk 5: boundaries inside every tensor and inside every row (13, 7 and 6 elements; della still reads
    whole rows); 16: spans of several rows per tensor; 1 << 20: one chunk per tensor."""
    n, kwargs, reference = API_CASES[case]
    method, shapes = _method_and_shapes(case)
    layout, pop, base = _population(n, shapes=shapes)
    kwargs = dict(kwargs)
    weights, seed = kwargs.pop("weights", None), kwargs.pop("seed", 0)
    out = Merger(method, base, weights=weights, seed=seed, **kwargs)(pop, Arena.empty(layout), chunk=chunk)
    for e in layout.entries:
        xs = [a.view(e) for a in pop.arenas]
        want = reference(base.view(e), xs, layout.groups[e.group][0] + e.offset)
        torch.testing.assert_close(
            out.view(e).double(), want, rtol=2e-6, atol=2e-6, msg=lambda m, name=e.name: f"{case} {name}: {m}"
        )
        if e.numel > 5:  # not vacuous: far from the average of the models and from the base
            assert (out.view(e).double() - sum(x.double() for x in xs) / n).abs().max() > FAR
            assert (out.view(e).double() - base.view(e).double()).abs().max() > FAR


@pytest.mark.parametrize("case", ["della", "della_linear", "della_flat"])
@pytest.mark.parametrize("chunk", [16, 1 << 20])
def test_della_gives_the_same_bits_without_the_extensions_selection_kernels(case, chunk, monkeypatch):
    """The torch paths of della's ranks, rescale norms and drop bits (what a GPU runs) against the CPU kernels."""
    n, kwargs, _ = API_CASES[case]
    method, shapes = _method_and_shapes(case)
    layout, pop, base = _population(n, shapes=shapes)
    kwargs = dict(kwargs)
    weights, seed = kwargs.pop("weights", None), kwargs.pop("seed", 0)
    merge = Merger(method, base, weights=weights, seed=seed, **kwargs)
    native = merge(pop, Arena.empty(layout), chunk=chunk)
    monkeypatch.setattr(ranks, "native_magnitudes", lambda x, base: False)
    monkeypatch.setattr(rescale, "native_magnitudes", lambda x, base: False)
    monkeypatch.setattr(drop_bits, "native_bits", lambda packed: False)
    fallback = merge(pop, Arena.empty(layout), chunk=chunk)
    for e in layout.entries:
        assert torch.equal(fallback.view(e), native.view(e)), e.name


@pytest.mark.parametrize("case", list(API_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_passes_give_the_same_bits_on_every_backend(case, dtype):
    """Breadcrumbs' band, della's drops, sce's selection and nearswap run in the fused operator: each CPU
    backend (and the reference contract) writes the same bits, with chunk boundaries inside the tensors."""
    n, kwargs, _ = API_CASES[case]
    method, shapes = _method_and_shapes(case)
    layout32, pop32, base32 = _population(n, seed=2, shapes=shapes)
    layout = Layout.from_params(((k,), dtype, s) for k, s in shapes.items())
    pop, base = MemoryPopulation(layout, n, "cpu"), Arena.empty(layout)
    for e, e32 in zip(layout.entries, layout32.entries):
        base.view(e).copy_(base32.view(e32))
        for a, a32 in zip(pop.arenas, pop32.arenas):
            a.view(e).copy_(a32.view(e32))
    kwargs = dict(kwargs)
    weights, seed = kwargs.pop("weights", None), kwargs.pop("seed", 0)
    # della without ranks spans chunk / N elements: 7 of them, as every other case's chunks (not 2)
    chunk = 7 * n if case == "della_flat" else 7
    outs = {
        backend: Merger(method, base, weights=weights, seed=seed, backend=backend, **kwargs)(
            pop, Arena.empty(layout), chunk=chunk
        )
        for backend in ["reference", *available_backends("cpu")]
    }
    assert len(outs) >= 2
    for backend, out in outs.items():
        for e in layout.entries:
            assert_bitwise_equal(out.view(e), outs["reference"].view(e), f"{case} {backend} {e.name}")


def test_della_refuses_tensors_of_more_than_two_dimensions():
    layout, pop, base = _population(2)
    with pytest.raises(ValueError, match="c has 3 dimensions"):
        Merger("della", base, density=0.5, epsilon=0.1)(pop, Arena.empty(layout))


@pytest.mark.parametrize("case", ["della_linear", "nearswap"])
def test_bfloat16_models_merge_in_fp32_and_round_once(case):
    n, kwargs, reference = API_CASES[case]
    shapes = DELLA_SHAPES if case.startswith("della") else SHAPES
    layout = Layout.from_params(((k,), torch.bfloat16, s) for k, s in shapes.items())
    _, pop32, base32 = _population(n, seed=1, shapes=shapes)
    pop = MemoryPopulation(layout, n, "cpu")
    base = Arena.empty(layout)
    for e, e32 in zip(layout.entries, base32.layout.entries):
        base.view(e).copy_(base32.view(e32))
        for a, a32 in zip(pop.arenas, pop32.arenas):
            a.view(e).copy_(a32.view(e32))
    kwargs = dict(kwargs)
    out = Merger(case, base, weights=kwargs.pop("weights", None), **kwargs)(pop, Arena.empty(layout), chunk=5)
    for e in layout.entries:
        assert out.view(e).dtype == torch.bfloat16
        want = reference(base.view(e), [a.view(e) for a in pop.arenas], layout.groups[e.group][0] + e.offset)
        torch.testing.assert_close(
            out.view(e).double(), want, rtol=2**-8, atol=1e-6, msg=lambda m, name=e.name: f"{case} {name}: {m}"
        )


def test_evolve_merges_the_population_with_breadcrumbs_ties(bert_pop, tmp_path):
    """With no generation, evolve's output is the population's merge: the same bytes as the merge CLI's."""
    from evolver_kernels.evolve import main as evolve_main

    models, base = bert_pop.models[:3], bert_pop.base
    flags = ["--density", "0.5", "--gamma", "0.05"]
    assert (
        evolve_main(
            [
                "--models",
                *models,
                "--dev",
                *bert_pop.dev,
                "--merge-method",
                "breadcrumbs_ties",
                "--base-model",
                base,
                *[f.replace("--", "--merge-") if f.startswith("--") else f for f in flags],
                "--generations",
                "0",
                "--out",
                str(tmp_path / "evolve"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "--method",
                "breadcrumbs_ties",
                "--base",
                base,
                "--models",
                *models,
                *flags,
                "--out",
                str(tmp_path / "merge"),
            ]
        )
        == 0
    )
    got, want = (_load(str(tmp_path / d)) for d in ("evolve", "merge"))
    assert set(want) <= set(got) and all(torch.equal(got[k], want[k]) for k in want)
