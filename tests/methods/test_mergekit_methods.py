"""slerp, nuslerp, multislerp, karcher and model_stock against mergekit itself, and against full-tensor
references, streamed in chunks smaller than a tensor and than a row.

mergekit runs every case's YAML in one subprocess (its import dominates the time); our CLI merges the same
YAML, and the same merge given by flags; every tensor is compared. Each comparison is checked not to be
vacuous: the merge is far (1e-4, 100x the tolerance) from every input, from their plain average and, for the
two-model interpolations, from the straight line between the endpoints."""

import json
import math

import pytest
import torch
import yaml
from _util import MERGEKIT_ATOL, MERGEKIT_RTOL, assert_same_as_mergekit, run_mergekit
from safetensors.torch import load_file

from evolver_kernels import methods
from evolver_kernels.merge import main
from evolver_kernels.methods.merger import Merger
from evolver_kernels.storage.arena import Arena, Layout
from evolver_kernels.storage.population import MemoryPopulation

RTOL, ATOL = MERGEKIT_RTOL, MERGEKIT_ATOL
FAR = 1e-4


def _cases(base, m):
    """name: (mergekit YAML without dtype, our flags, the models merged in the output (for the vacuity
    checks), the t of a two-model interpolation or None)."""
    return {
        "slerp": (
            {
                "merge_method": "slerp",
                "base_model": m[0],
                "models": [{"model": m[0]}, {"model": m[1]}],
                "parameters": {"t": 0.3},
            },
            ["--method", "slerp", "--models", m[0], m[1], "--t", "0.3"],
            [m[0], m[1]],
            0.3,
        ),
        # base_model not listed: mergekit adds it to the inputs, as the first endpoint
        "slerp_unlisted_base": (
            {"merge_method": "slerp", "base_model": base, "models": [{"model": m[2]}], "parameters": {"t": 0.7}},
            ["--method", "slerp", "--models", base, m[2], "--t", "0.7"],
            [base, m[2]],
            0.7,
        ),
        "nuslerp": (
            {
                "merge_method": "nuslerp",
                "models": [
                    {"model": m[0], "parameters": {"weight": 1.0}},
                    {"model": m[1], "parameters": {"weight": 2.5}},
                ],
            },
            ["--method", "nuslerp", "--models", m[0], m[1], "--weights", "1", "2.5"],
            [m[0], m[1]],
            2.5 / 3.5,
        ),
        "nuslerp_base_rows": (
            {
                "merge_method": "nuslerp",
                "base_model": base,
                "models": [
                    {"model": m[1], "parameters": {"weight": 2.0}},
                    {"model": m[2], "parameters": {"weight": 1.0}},
                ],
                "parameters": {"nuslerp_flatten": False},
            },
            [
                "--method",
                "nuslerp",
                "--base",
                base,
                "--models",
                m[1],
                m[2],
                "--weights",
                "2",
                "1",
                "--nuslerp-flatten",
                "false",
            ],
            [m[1], m[2]],
            None,
        ),
        # the base listed among the models is the base, not a third model (mergekit's non-base inputs)
        "nuslerp_base_columns": (
            {
                "merge_method": "nuslerp",
                "base_model": base,
                "models": [
                    {"model": base},
                    {"model": m[0], "parameters": {"weight": 1.0}},
                    {"model": m[2], "parameters": {"weight": 3.0}},
                ],
                "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
            },
            [
                "--method",
                "nuslerp",
                "--base",
                base,
                "--models",
                m[0],
                m[2],
                "--weights",
                "1",
                "3",
                "--nuslerp-flatten",
                "false",
                "--nuslerp-row-wise",
                "true",
            ],
            [m[0], m[2]],
            None,
        ),
        "multislerp": (
            {
                "merge_method": "multislerp",
                "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(m, (1.0, 2.0, 0.5))],
            },
            ["--method", "multislerp", "--models", *m, "--weights", "1", "2", "0.5"],
            m,
            None,
        ),
        "multislerp_base": (
            {
                "merge_method": "multislerp",
                "base_model": base,
                "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(m, (1.0, 0.5, 2.0))],
                "parameters": {"normalize_weights": False},
            },
            [
                "--method",
                "multislerp",
                "--base",
                base,
                "--models",
                *m,
                "--weights",
                "1",
                "0.5",
                "2",
                "--normalize-weights",
                "false",
            ],
            m,
            None,
        ),
        "karcher": (
            {
                "merge_method": "karcher",
                "models": [{"model": p} for p in m],
                "parameters": {"max_iter": 20, "tol": 1e-6},
            },
            ["--method", "karcher", "--models", *m, "--max-iter", "20", "--tol", "1e-6"],
            m,
            None,
        ),
        # karcher gives a base no role: mergekit merges base_model as one more model
        "karcher_base": (
            {"merge_method": "karcher", "base_model": base, "models": [{"model": p} for p in m]},
            ["--method", "karcher", "--models", *m, base],
            [*m, base],
            None,
        ),
        "model_stock": (
            {"merge_method": "model_stock", "base_model": base, "models": [{"model": p} for p in m]},
            ["--method", "model_stock", "--base", base, "--models", *m],
            m,
            None,
        ),
        "model_stock_filter_wise": (
            {
                "merge_method": "model_stock",
                "base_model": base,
                "models": [{"model": p} for p in m],
                "parameters": {"filter_wise": True},
            },
            ["--method", "model_stock", "--base", base, "--models", *m, "--filter-wise", "true"],
            m,
            None,
        ),
    }


@pytest.fixture(scope="module")
def merged(llama_pop, tmp_path_factory):
    """{case: (ours from the YAML, ours from flags, mergekit's, the models merged, t)}."""
    root = tmp_path_factory.mktemp("mergekit-methods")
    cases = _cases(llama_pop.base, llama_pop.models)
    run_mergekit(root, {name: {**config, "dtype": "float32"} for name, (config, _, _, _) in cases.items()})
    out = {}
    for name, (_, flags, inputs, t) in cases.items():
        assert main(["--config", str(root / f"{name}.yml"), "--out", str(root / f"{name}-yaml")]) == 0
        assert main([*flags, "--out", str(root / f"{name}-flags")]) == 0
        out[name] = tuple(
            load_file(str(root / f"{name}-{kind}" / "model.safetensors")) for kind in ("yaml", "flags", "mergekit")
        ) + (inputs, t)
    return out


CASE_NAMES = list(_cases("b", ["m0", "m1", "m2"]))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_same_tensors_as_mergekit(merged, case):
    from_yaml, from_flags, theirs, inputs, t = merged[case]
    assert_same_as_mergekit(case, from_yaml, from_flags, theirs)
    # not vacuous: far from every input, from their average and from the straight line
    weights = [load_file(f"{p}/model.safetensors") for p in inputs]
    others = weights + [{k: sum(w[k] for w in weights) / len(weights) for k in theirs}]
    if t is not None:
        others.append({k: (1 - t) * weights[0][k] + t * weights[1][k] for k in theirs})
    for other in others:
        assert max((theirs[k] - other[k]).abs().max().item() for k in theirs) > FAR, case


def test_merge_json_records_the_settings(merged, llama_pop, tmp_path):
    m = llama_pop.models
    assert (
        main(["--method", "nuslerp", "--models", m[0], m[1], "--nuslerp-flatten", "no", "--out", str(tmp_path / "o")])
        == 0
    )
    record = json.loads((tmp_path / "o" / "merge.json").read_text())
    assert record["method"] == "nuslerp" and record["nuslerp_flatten"] is False and record["nuslerp_row_wise"] is False


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "slerp", "--models", "{m0}", "{m1}", "{m2}"], "slerp merges exactly 2 models, got 3"),
        (["--method", "slerp", "--base", "{base}", "--models", "{m0}", "{m1}"], "--base does not apply to slerp"),
        (["--method", "slerp", "--models", "{m0}", "{m1}", "--weights", "1", "2"], "--weights does not apply to slerp"),
        (
            ["--method", "karcher", "--models", "{m0}", "{m1}", "--weights", "1", "2"],
            "--weights does not apply to karcher",
        ),
        (["--method", "model_stock", "--models", "{m0}", "{m1}"], "model_stock needs a base model"),
        (["--method", "nuslerp", "--models", "{m0}", "{m1}", "--nuslerp-flatten", "maybe"], "invalid boolean value"),
        (["--method", "karcher", "--models", "{m0}", "{m1}", "--max-iter", "-1"], "--max-iter must be in [0, inf)"),
    ],
)
def test_flag_errors(llama_pop, tmp_path, capsys, argv, message):
    m = llama_pop.models
    argv = [a.format(m0=m[0], m1=m[1], m2=m[2], base=llama_pop.base) for a in argv]
    if "boolean" in message:  # argparse's own error
        with pytest.raises(SystemExit):
            main([*argv, "--out", str(tmp_path / "o")])
    else:
        assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "config,message",
    [
        (
            {"merge_method": "slerp", "models": ["{m0}", "{m1}"], "parameters": {"t": 0.5}},
            "base_model is required by slerp",
        ),
        (
            {"merge_method": "slerp", "base_model": "{m0}", "models": ["{m0}", "{m1}", "{m2}"]},
            "slerp interpolates base_model and exactly one other model, got 2 others",
        ),
        (
            {"merge_method": "karcher", "models": [{"model": "{m0}", "parameters": {"weight": 2}}, "{m1}"]},
            "weight does not apply to karcher",
        ),
        (
            {
                "merge_method": "model_stock",
                "base_model": "{base}",
                "models": ["{m0}", "{m1}"],
                "parameters": {"filter_wise": "sometimes"},
            },
            "filter_wise must be true or false, got 'sometimes'",
        ),
        (
            {
                "merge_method": "slerp",
                "base_model": "{m0}",
                "models": ["{m0}", "{m1}"],
                "parameters": {"t": [{"pattern": "mlp", "value": 0.3}]},
            },
            "a conditional is {filter: SUBSTRING, value: V}",
        ),
    ],
)
def test_yaml_errors(llama_pop, tmp_path, capsys, config, message):
    m = llama_pop.models
    names = {"{m0}": m[0], "{m1}": m[1], "{m2}": m[2], "{base}": llama_pop.base}

    def fill(x):
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fill(v) for v in x]
        return names.get(x, x) if isinstance(x, str) else x

    (tmp_path / "c.yml").write_text(yaml.safe_dump(fill(config)))
    assert main(["--config", str(tmp_path / "c.yml"), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_evolve_refusals_are_in_the_records():
    assert methods.get("slerp").evolve_refusal and methods.get("nuslerp").evolve_refusal
    evolvable = methods.names(evolvable=True)
    assert {"multislerp", "karcher", "model_stock"} <= set(evolvable) and "slerp" not in evolvable


# -- the Python API in chunks smaller than a tensor and than a row, against full-tensor references in fp64 --

SHAPES = {"a": (7, 13), "b": (5,), "c": (5, 2, 7), "d": (11, 6)}
LAYOUT = Layout.from_params(((n,), torch.float32, s) for n, s in SHAPES.items())


def _population(n: int, seed: int = 0, layout: Layout = LAYOUT):
    """n fine-tune-like models of odd shapes (a base plus noise of a third of its scale), and the base; the
    references get the stored (rounded) values in fp64."""
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    models = [{k: base[k] + 0.3 * torch.randn(s, generator=gen) for k, s in SHAPES.items()} for _ in range(n)]
    pop = MemoryPopulation(layout, n, "cpu")
    base_arena = Arena.empty(layout)
    for e in layout.entries:
        base_arena.view(e).copy_(base[e.name])
        for i, m in enumerate(models):
            pop.arenas[i].view(e).copy_(m[e.name])
    stored = [{e.name: a.view(e).double() for e in layout.entries} for a in pop.arenas]
    return pop, base_arena, {e.name: base_arena.view(e).double() for e in layout.entries}, stored


def _ref_nuslerp(t, v0, v1, along):
    """mergekit's nuslerp written out: vectors along the last dim (along -1), the first (0) or flattened."""
    shape = v0.shape
    if along is None:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif along == 0:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos((u0 * u1).sum(-1, keepdim=True).clamp(-1, 1))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return (out.transpose(0, -1) if along == 0 else out).reshape(shape)


def _ref_multislerp(vs, w):
    w = torch.tensor(w, dtype=torch.float64) / sum(w)
    flat = torch.stack([v.reshape(-1) for v in vs])
    norms = flat.norm(dim=1, keepdim=True)
    units = flat / (norms + 1e-8)
    mean = (units * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangent = ((units - (units @ mean)[:, None] * mean) * w[:, None]).sum(0)
    tn = tangent.norm() + 1e-8
    return ((mean * torch.cos(tn) + tangent * torch.sin(tn) / tn) * (norms[:, 0] * w).sum()).reshape(vs[0].shape)


def _ref_karcher(xs, iters=50):
    units = [x.reshape(-1) / x.norm() for x in xs]
    mean = sum(units) / len(units)
    mean = mean / mean.norm()
    for _ in range(iters):
        tangent = 0
        for u in units:
            dot = (mean @ u).clamp(-1, 1)
            theta = torch.acos(dot)
            tangent = tangent + (theta / torch.sin(theta)) * (u - dot * mean) / len(units)
        tn = tangent.norm()
        if tn < 1e-12:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * tangent / tn
        mean = mean / mean.norm()
    return (mean * sum(x.norm() for x in xs) / len(xs)).reshape(xs[0].shape)


def _ref_model_stock(b, xs, rows):
    shape, n = b.shape, len(xs)
    as_rows = (lambda x: x.reshape(-1, shape[-1])) if rows and b.dim() >= 2 else (lambda x: x.reshape(1, -1))
    b, xs = as_rows(b), [as_rows(x) for x in xs]
    ds = [x - b for x in xs]
    cos = torch.stack(
        [(ds[i] * ds[j]).sum(-1) / (ds[i].norm(dim=-1) * ds[j].norm(dim=-1)) for i in range(n) for j in range(i + 1, n)]
    ).mean(0)
    t = (n * cos / (1 + (n - 1) * cos))[:, None]
    return (t * sum(xs) / n + (1 - t) * b).reshape(shape)


def _slerp_ref(t, x0, x1):
    a, b = x0.reshape(-1), x1.reshape(-1)
    theta = math.acos(float((a @ b) / (a.norm() * b.norm())))
    return (math.sin((1 - t) * theta) * x0 + math.sin(t * theta) * x1) / math.sin(theta)


def _references(case, base, ms):
    if case == "slerp":
        return {k: _slerp_ref(0.3, ms[0][k], ms[1][k]) for k in SHAPES}
    if case.startswith("nuslerp"):
        along = {"nuslerp": None, "nuslerp_rows": -1, "nuslerp_columns": 0}[case]
        return {k: base[k] + _ref_nuslerp(0.75, ms[0][k] - base[k], ms[1][k] - base[k], along) for k in SHAPES}
    if case == "multislerp":
        return {k: base[k] + _ref_multislerp([m[k] - base[k] for m in ms], [1.0, 2.0, 0.5, 1.5]) for k in SHAPES}
    if case == "karcher":
        return {k: _ref_karcher([m[k] for m in ms]) for k in SHAPES}
    return {k: _ref_model_stock(base[k], [m[k] for m in ms], case == "model_stock_rows") for k in SHAPES}


API_CASES = {
    "slerp": (2, lambda b: Merger("slerp", t=0.3)),
    "nuslerp": (2, lambda b: Merger("nuslerp", b, weights=[1.0, 3.0])),
    "nuslerp_rows": (2, lambda b: Merger("nuslerp", b, weights=[1.0, 3.0], nuslerp_flatten=False)),
    "nuslerp_columns": (
        2,
        lambda b: Merger("nuslerp", b, weights=[1.0, 3.0], nuslerp_flatten=False, nuslerp_row_wise=True),
    ),
    "multislerp": (4, lambda b: Merger("multislerp", b, weights=[1.0, 2.0, 0.5, 1.5])),
    "karcher": (4, lambda b: Merger("karcher", max_iter=50, tol=1e-9)),
    "model_stock": (4, lambda b: Merger("model_stock", b)),
    "model_stock_rows": (4, lambda b: Merger("model_stock", b, filter_wise=True)),
}


@pytest.mark.parametrize("case", list(API_CASES))
@pytest.mark.parametrize("chunk", [5, 16, 1 << 20])
def test_streamed_merge_equals_full_tensor_reference(case, chunk):
    """chunk 5: boundaries inside every tensor, inside every row (13, 7 and 6 elements) and inside the matrix
    rows the column mode reads (13 and 14 elements); 16: spans of whole rows, several per tensor."""
    n, merger = API_CASES[case]
    pop, base_arena, base, ms = _population(n)
    out = merger(base_arena)(pop, Arena.empty(LAYOUT), chunk=chunk)
    want = _references(case, base, ms)
    for e in LAYOUT.entries:
        torch.testing.assert_close(
            out.view(e).double(), want[e.name], rtol=2e-6, atol=2e-6, msg=lambda m, n=e.name: f"{case} {n}: {m}"
        )
        assert (out.view(e).double() - sum(m[e.name] for m in ms) / n).abs().max() > FAR


@pytest.mark.parametrize(
    "case", ["slerp", "nuslerp_columns", "multislerp", "karcher", "model_stock", "model_stock_rows"]
)
def test_bfloat16_models_merge_in_fp32_and_round_once(case):
    """bf16 arenas: computed in fp32 from the stored values, one rounding to bf16 (within one bf16 ulp)."""
    layout = Layout.from_params(((n,), torch.bfloat16, s) for n, s in SHAPES.items())
    n, merger = API_CASES[case]
    pop, base_arena, base, ms = _population(n, seed=1, layout=layout)
    out = merger(base_arena)(pop, Arena.empty(layout), chunk=5)
    want = _references(case, base, ms)
    for e in layout.entries:
        assert out.view(e).dtype == torch.bfloat16
        torch.testing.assert_close(
            out.view(e).double(), want[e.name], rtol=2**-8, atol=1e-6, msg=lambda m, n=e.name: f"{case} {n}: {m}"
        )


@pytest.mark.parametrize(
    "method,flags", [("model_stock", ["--merge-filter-wise", "true"]), ("karcher", ["--merge-max-iter", "3"])]
)
def test_evolve_merges_the_population_with_a_streamed_method(bert_pop, tmp_path, method, flags):
    """With no generation, evolve's output is the population's merge: the same bytes as the merge CLI's."""
    from evolver_kernels.evolve import main as evolve_main

    models, base = bert_pop.models[:3], bert_pop.base
    with_base = ["--base-model", base] if method == "model_stock" else []
    assert (
        evolve_main(
            [
                "--models",
                *models,
                "--dev",
                *bert_pop.dev,
                "--merge-method",
                method,
                *with_base,
                *flags,
                "--generations",
                "0",
                "--out",
                str(tmp_path / "evolve"),
            ]
        )
        == 0
    )
    merge_flags = [f.replace("--merge-", "--") for f in flags]
    assert (
        main(
            [
                "--method",
                method,
                *(["--base", base] if with_base else []),
                "--models",
                *models,
                *merge_flags,
                "--out",
                str(tmp_path / "merge"),
            ]
        )
        == 0
    )
    got, want = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("evolve", "merge"))
    assert set(want) <= set(got) and all(torch.equal(got[k], want[k]) for k in want)
