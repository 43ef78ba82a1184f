"""ram, ramplus_tl and arcee_fusion against mergekit itself, and against full-tensor references of their formulas
streamed in chunks smaller than a tensor and than a row; arcee_fusion on a tensor above mergekit's 1M-element
quantile sample (where mergekit's threshold is random) against its exact full-tensor formula.

mergekit runs every case's YAML in one subprocess (its import dominates the time); our CLI merges the same YAML
in chunks of 40 elements (smaller than every matrix, and than the rows of down_proj: arcee_fusion's three
passes and ramplus_tl's counting pass run over many chunks), and the same merge given by flags in the default
chunk (one per tensor): every tensor equals mergekit's within fp32 rounding and the two of ours are the same
bytes. Each comparison is checked not to be vacuous: the merge is far (1e-4, 100x the tolerance) from every
input, from their average and from the merge without the method's own step (task arithmetic for ram, ram for
ramplus_tl). RAM's models are the base with a random 40% of each tensor's elements changed (sparse task
vectors: elements changed by none, one or several models), or the dense fine-tunes with an epsilon that leaves
some changes out."""

import functools
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from _util import assert_same_as_mergekit, merge_cli_error, random_population, run_mergekit
from safetensors.torch import load_file, save_file

from evolver_kernels import methods
from evolver_kernels.merge import main
from evolver_kernels.methods import merger
from evolver_kernels.methods.arcee_fusion import kth_smallest
from evolver_kernels.methods.merger import Merger
from evolver_kernels.storage.arena import Arena

FAR = 1e-4
CLI_CHUNK = 40


def _load(path):
    return load_file(os.path.join(path, "model.safetensors"))


# -- full-tensor references (mergekit's formulas, written out) ------------------------------------------------


def _ref_ram(base, xs, epsilon=1e-5, plus=False, r=0.1, alpha=0.2):
    """ram / ramplus_tl of one tensor in fp64 from fp32 task vectors."""
    taus = torch.stack([x.float() - base.float() for x in xs])
    nz = taus.abs() > epsilon
    count = nz.sum(0)
    lam = torch.ones(len(xs), dtype=torch.float64)
    if plus:
        shared = (nz & (count > 1)).flatten(1).sum(1).double()
        unique = (nz & (count == 1)).flatten(1).sum(1).double()
        lam = 1 + r * (shared / unique.clamp(min=epsilon)).clamp(min=0, max=alpha)
        lam = torch.where(unique == 0, 1.0, lam)  # unused there (mergekit, epsilon 0 and S = 0: NaN)
    lam = lam.view(-1, *([1] * base.dim()))
    t = taus.double() * nz
    merged = torch.where(count == 1, t * lam, t / count.clamp(min=1)).sum(0)
    return base.double() + merged


def _ref_fusion(base, x):
    """arcee_fusion of one tensor in fp32 with mergekit's ops, the quantiles exact over the whole tensor."""
    b, x = base.float(), x.float()
    p = F.softmax(x, dim=-1) + 1e-8
    q = F.softmax(b, dim=-1) + 1e-8
    importance = (x - b).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    ordered = torch.sort(importance.reshape(-1)).values
    n = ordered.numel()
    q1, med, q3 = ordered[[(n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4]]
    return b + (x - b) * (importance >= med + 1.5 * (q3 - q1)).float()


# -- against mergekit ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sparse_models(llama_pop, tmp_path_factory):
    """3 models: the llama base with a random 40% of each tensor's elements moved by N(0, 0.05^2)."""
    root = tmp_path_factory.mktemp("ram-sparse")
    base = _load(llama_pop.base)
    paths = []
    for k in range(3):
        gen = torch.Generator().manual_seed(100 + k)
        path = str(root / f"sparse-{k}")
        shutil.copytree(llama_pop.base, path)
        tensors = {}
        for name, t in base.items():
            changed = torch.rand(t.shape, generator=gen) < 0.4
            tensors[name] = t + torch.where(changed, 0.05 * torch.randn(t.shape, generator=gen), 0.0)
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        paths.append(path)
    return paths


def _cases(base, m, s):
    """name: (mergekit YAML without dtype, our flags (None: the YAML's conditionals have no flags), what the
    merge must be far from: model paths, "average", ("ram", epsilon) or ("task_arithmetic",))."""
    ms = [{"model": p} for p in m]
    ss = [{"model": p} for p in s]
    return {
        "ram": (
            {"merge_method": "ram", "base_model": base, "models": ss},
            ["--method", "ram", "--base", base, "--models", *s],
            [*s, "average", ("task_arithmetic",)],
        ),
        "ram_epsilon": (
            {"merge_method": "ram", "base_model": base, "models": ms, "parameters": {"epsilon": 0.03}},
            ["--method", "ram", "--base", base, "--models", *m, "--ram-epsilon", "0.03"],
            [*m, "average", ("task_arithmetic",)],
        ),
        "ramplus_tl": (
            {"merge_method": "ramplus_tl", "base_model": base, "models": ss},
            ["--method", "ramplus_tl", "--base", base, "--models", *s],
            [*s, "average", ("ram", 1e-5)],
        ),
        "ramplus_tl_params": (
            {
                "merge_method": "ramplus_tl",
                "base_model": base,
                "models": ms,
                "parameters": {"epsilon": 0.03, "r": 0.5, "alpha": 1.5},
            },
            [
                "--method",
                "ramplus_tl",
                "--base",
                base,
                "--models",
                *m,
                "--ram-epsilon",
                "0.03",
                "--r",
                "0.5",
                "--ramplus-alpha",
                "1.5",
            ],
            [*m, "average", ("ram", 0.03)],
        ),
        # per-tensor settings through mergekit's names: a filter on r, a gradient over the layers on alpha
        "ramplus_tl_per_tensor": (
            {
                "merge_method": "ramplus_tl",
                "base_model": base,
                "models": ss,
                "parameters": {"r": [{"filter": "mlp", "value": 0.8}, {"value": 0.3}], "alpha": [0.5, 3.0]},
            },
            None,
            [*s, "average", ("ram", 1e-5)],
        ),
        # the base listed among the models is the base (mergekit's non-base input is the other one)
        "arcee_fusion": (
            {"merge_method": "arcee_fusion", "base_model": base, "models": [{"model": base}, {"model": m[0]}]},
            ["--method", "arcee_fusion", "--base", base, "--models", m[0]],
            [base, m[0], "average"],
        ),
        "arcee_fusion_sparse": (
            {"merge_method": "arcee_fusion", "base_model": base, "models": [{"model": s[1]}]},
            ["--method", "arcee_fusion", "--base", base, "--models", s[1]],
            [base, s[1], "average"],
        ),
    }


@pytest.fixture(scope="module")
def merged(llama_pop, sparse_models, tmp_path_factory):
    """{case: (ours from the YAML in chunks of 40, ours from flags in one chunk per tensor, mergekit's)}."""
    root = tmp_path_factory.mktemp("mergekit-ram-fusion")
    cases = _cases(llama_pop.base, llama_pop.models, sparse_models)
    run_mergekit(root, {name: {**config, "dtype": "float32"} for name, (config, _, _) in cases.items()})
    out = {}
    for name, (_, flags, _) in cases.items():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(merger, "merge_per_tensor", functools.partial(merger.merge_per_tensor, chunk=CLI_CHUNK))
            assert main(["--config", str(root / f"{name}.yml"), "--out", str(root / f"{name}-yaml")]) == 0
        if flags is not None:
            assert main([*flags, "--out", str(root / f"{name}-flags")]) == 0
        from_yaml = _load(str(root / f"{name}-yaml"))
        out[name] = (
            from_yaml,
            _load(str(root / f"{name}-flags")) if flags else from_yaml,
            _load(str(root / f"{name}-mergekit")),
        )
    return out


def _far_from(what, base_path, inputs, keys):
    if isinstance(what, str) and what != "average":
        return _load(what)
    base = _load(base_path)
    xs = [_load(p) for p in inputs]
    if what == "average":
        return {k: sum(x[k] for x in xs) / len(xs) for k in keys}
    if what[0] == "task_arithmetic":
        return {k: base[k] + sum(x[k] - base[k] for x in xs) for k in keys}
    return {k: _ref_ram(base[k], [x[k] for x in xs], epsilon=what[1]).float() for k in keys}


CASE_NAMES = list(_cases("b", ["m0", "m1", "m2"], ["s0", "s1", "s2"]))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_same_tensors_as_mergekit(merged, llama_pop, sparse_models, case):
    from_yaml, from_flags, theirs = merged[case]
    assert_same_as_mergekit(case, from_yaml, from_flags, theirs)
    config, _, far = _cases(llama_pop.base, llama_pop.models, sparse_models)[case]
    inputs = [e["model"] for e in config["models"]]
    if case.startswith("arcee"):
        inputs = [llama_pop.base, inputs[-1]]  # the average of the base and the model
    for what in far:
        other = _far_from(what, llama_pop.base, inputs, theirs)
        assert max((theirs[k] - other[k]).abs().max().item() for k in theirs) > FAR, (case, what)


def test_per_tensor_settings_took_effect(merged):
    """The filtered / gradient r and alpha differ from the defaults' merge (they are not dropped)."""
    per_tensor, default = merged["ramplus_tl_per_tensor"][0], merged["ramplus_tl"][0]
    for key in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        assert (per_tensor[key] - default[key]).abs().max() > FAR, key


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "arcee_fusion", "--models", "{m0}", "{m1}"], "arcee_fusion merges exactly 1 model, got 2"),
        (["--method", "arcee_fusion", "--weights", "2"], "--weights does not apply to arcee_fusion"),
        (["--method", "ram", "--weights", "1", "2"], "--weights does not apply to ram"),
        (["--method", "ram", "--ram-epsilon", "-0.1"], "--ram-epsilon must be in [0, inf)"),
        (["--method", "ram", "--r", "0.5"], "--r does not apply to ram"),
        (["--method", "ramplus_tl", "--ramplus-alpha", "inf"], "--ramplus-alpha must be any finite number"),
        (["--method", "ram", "--ramplus-alpha", "0.5"], "--ramplus-alpha does not apply to ram"),
        (["--method", "ram", "--epsilon", "0.03"], "--epsilon does not apply to ram (its parameters: ram_epsilon)"),
        (["--method", "ramplus_tl", "--alpha", "0.3"], "--alpha does not apply to ramplus_tl"),
    ],
)
def test_flag_errors(llama_pop, tmp_path, capsys, argv, message):
    n = 1 if "arcee_fusion" in argv else 2
    assert message in merge_cli_error(llama_pop, tmp_path / "o", capsys, argv, n)


def test_registry_records():
    """mergekit's names read through aliases, without changing della's epsilon or RegMean's alpha."""
    assert {"ram", "ramplus_tl"} <= set(methods.names(evolvable=True))
    assert "arcee_fusion" not in methods.names(evolvable=True) and methods.get("arcee_fusion").evolve_refusal
    assert methods.get("ram").param("epsilon", aliases=True).name == "ram_epsilon"
    assert methods.get("ramplus_tl").param("alpha", aliases=True).name == "ramplus_alpha"
    # flags and the Python API use the names alone: --epsilon is della's, --alpha RegMean's
    assert methods.get("ram").param("epsilon") is None and methods.get("ramplus_tl").param("alpha") is None
    assert methods.get("ramplus_tl").settings({"ram_epsilon": 0.2, "ramplus_alpha": 3, "r": 1}) == {
        "ram_epsilon": 0.2,
        "r": 1.0,
        "ramplus_alpha": 3.0,
    }
    params = methods.all_params()
    assert (params["epsilon"].default, params["epsilon"].per_model) == (0.15, True)  # della's
    assert (params["alpha"].default, params["alpha"].high) == (0.5, 1.0)  # RegMean's
    for name in ("ram", "ramplus_tl", "arcee_fusion"):
        record = methods.get(name)
        assert record.needs_base and not record.uses_weights and record.min_models == 1
    assert methods.get("arcee_fusion").max_models == 1 and methods.get("ram").max_models is None


# -- the Python API in chunks smaller than a tensor and than a row, against full-tensor references -------------

SHAPES = {"a": (7, 13), "b": (5,), "c": (5, 2, 7), "d": (11, 6), "e": (3, 1), "f": (2, 40)}


def _population(n, seed=0, sparse=0.5, dtype=torch.float32, shapes=SHAPES):
    """n models around a random base; with sparse, each changes a random fraction of the elements."""
    return random_population(shapes, n, seed, sparse, dtype)


API_CASES = {
    # name: (models, Merger kwargs, reference(base, xs))
    "ram": (3, dict(), lambda b, xs: _ref_ram(b, xs)),
    "ram_epsilon": (4, dict(ram_epsilon=0.2), lambda b, xs: _ref_ram(b, xs, epsilon=0.2)),
    "ramplus_tl": (3, dict(), lambda b, xs: _ref_ram(b, xs, plus=True)),
    "ramplus_tl_params": (
        4,
        dict(ram_epsilon=0.1, r=0.7, ramplus_alpha=2.5),
        lambda b, xs: _ref_ram(b, xs, 0.1, True, 0.7, 2.5),
    ),
    # one model: nothing shared, lambda 1; the changes at or below epsilon left out
    "ramplus_tl_one": (1, dict(r=0.5, ram_epsilon=0.2), lambda b, xs: _ref_ram(b, xs, 0.2, True, 0.5)),
    "arcee_fusion": (1, dict(), lambda b, xs: _ref_fusion(b, xs[0]).double()),
}


@pytest.mark.parametrize("case", list(API_CASES))
@pytest.mark.parametrize("chunk", [5, 16, 1 << 20])
def test_streamed_merge_equals_full_tensor_reference(case, chunk):
    """chunk 5: boundaries inside every tensor and every row (arcee_fusion still reads whole rows: 13, 7, 6 and
    40 elements); 16: spans of several rows; 1 << 20: one chunk per tensor."""
    n, kwargs, reference = API_CASES[case]
    layout, pop, base = _population(n, sparse=0.0 if case.startswith("arcee") else 0.5)
    method = case.removesuffix("_params").removesuffix("_epsilon").removesuffix("_one")
    out = Merger(method, base, **kwargs)(pop, Arena.empty(layout), chunk=chunk)
    far_avg = far_base = 0.0
    for e in layout.entries:
        xs = [a.view(e) for a in pop.arenas]
        want = reference(base.view(e), xs)
        torch.testing.assert_close(
            out.view(e).double(), want, rtol=2e-6, atol=2e-6, msg=lambda m, name=e.name: f"{case} {name}: {m}"
        )
        if case.startswith("arcee"):
            assert torch.equal(out.view(e), want.float()), e.name  # the same fp32 ops: the same bits
        far_avg = max(far_avg, float((out.view(e).double() - sum(x.double() for x in xs) / n).abs().max()))
        far_base = max(far_base, float((out.view(e).double() - base.view(e).double()).abs().max()))
    assert far_avg > FAR and far_base > FAR  # not vacuous


@pytest.mark.parametrize("case", ["ramplus_tl", "arcee_fusion"])
def test_bfloat16_models_merge_in_fp32_and_round_once(case):
    n, kwargs, reference = API_CASES[case]
    layout, pop, base = _population(n, seed=1, sparse=0.0 if case.startswith("arcee") else 0.5, dtype=torch.bfloat16)
    out = Merger(case, base, **kwargs)(pop, Arena.empty(layout), chunk=5)
    for e in layout.entries:
        assert out.view(e).dtype == torch.bfloat16
        want = reference(base.view(e), [a.view(e) for a in pop.arenas])  # from the bf16 values, in fp32 / fp64
        torch.testing.assert_close(
            out.view(e).double(), want, rtol=2**-8, atol=1e-6, msg=lambda m, name=e.name: f"{case} {name}: {m}"
        )


def test_ramplus_tl_epsilon_zero_with_an_unchanged_model_is_not_nan():
    """A model that changed nothing (S = U = 0, epsilon 0): its lambda is unused (mergekit: 0 / 0, a NaN tensor)."""
    layout, pop, base = _population(3, seed=2)
    pop.arenas[1].buffers["float32"].copy_(base.buffers["float32"])
    out = Merger("ramplus_tl", base, ram_epsilon=0.0, r=0.5, ramplus_alpha=1.0)(pop, Arena.empty(layout), chunk=7)
    for e in layout.entries:
        want = _ref_ram(base.view(e), [a.view(e) for a in pop.arenas], 0.0, True, 0.5, 1.0)
        torch.testing.assert_close(out.view(e).double(), want, rtol=2e-6, atol=2e-6)


def test_arcee_fusion_above_mergekits_sample_size_uses_exact_quantiles():
    """1,049,600 elements (mergekit samples 1,000,000 at random there): ours equals the formula's exact
    full-tensor quantiles, in spans of 256 rows (three passes) and in one chunk (sorted), the same bits."""
    layout, pop, base = _population(1, seed=3, sparse=0.0, shapes={"big": (1025, 1024)})
    e = layout.entries[0]
    want = _ref_fusion(base.view(e), pop.arenas[0].view(e))
    kept = float((want != base.view(e)).double().mean())
    assert 0.005 < kept < 0.5, kept  # not vacuous: some of the model's changes taken, most not
    for chunk in (1 << 18, 1 << 21):
        out = Merger("arcee_fusion", base)(pop, Arena.empty(layout), chunk=chunk)
        assert torch.equal(out.view(e), want), chunk


def test_kth_smallest_is_exact_on_signed_values():
    """The radix selection against a sort: negatives, -0.0 and +0.0, ties, infinities, many spans."""
    gen = torch.Generator().manual_seed(4)
    v = torch.randn(10007, generator=gen) * torch.randint(0, 3, (10007,), generator=gen).float()
    v[:50], v[50:60], v[60:70], v[70:90], v[90:95] = -0.0, 1e-30, -1e-30, float("inf"), -float("inf")
    v[95:200] = 0.125
    v = v[torch.randperm(v.numel(), generator=gen)]
    ordered = torch.sort(v).values
    spans = [(a, min(a + 333, v.numel())) for a in range(0, v.numel(), 333)]
    ks = [1, 5, 6, 50, 51, 3000, 5004, 9999, 10006, 10007, 8000]
    got = kth_smallest(lambda a, b: v[a:b], spans, ks)
    assert got == [float(ordered[k - 1]) for k in ks]
    with pytest.raises(ValueError, match="k must be in"):
        kth_smallest(lambda a, b: v[a:b], spans, [0])
