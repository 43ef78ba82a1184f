"""One definition per concept: a merge method and a DE strategy registered from this file alone run through
`evolve` and `merge` (flags, YAML keys, validation and help all derived from their records), the README's
method table is the registry's, and --population-size is a real option."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from evolver_kernels import methods
from evolver_kernels.evolve import main as evolve_main
from evolver_kernels.evolve import strategies
from evolver_kernels.evolve.offspring import WeightPipeline
from evolver_kernels.io import model_io
from evolver_kernels.merge import main as merge_main
from evolver_kernels.storage.arena import Arena, Layout, iter_chunks, safetensors_files
from evolver_kernels.storage.population import make_population

GAIN = methods.Param("gain", float, 1.0, "scale of the largest task-vector element", low=0.0, high=10.0, low_open=True)


def _max_magnitude(pop, out, ctx):
    """out = base + gain * (the task-vector element of largest magnitude over the models), chunk by chunk."""
    for group, (_, size) in pop.layout.groups.items():
        for lo, hi in iter_chunks(size, ctx.chunk):
            base = methods.base_chunk(ctx.base, group, lo, hi, torch.device("cpu")).float()
            taus = [pop.read(k, group, lo, hi).float() - base for k in range(pop.size)]
            pick = taus[0]
            for tau in taus[1:]:
                pick = torch.where(tau.abs() > pick.abs(), tau, pick)
            out.buffers[group][lo:hi].copy_(base + ctx.settings["gain"] * pick)
    return out


@pytest.fixture()
def max_magnitude():
    record = methods.register(
        methods.MergeMethod(
            name="max_magnitude",
            summary="base + gain * the largest-magnitude task-vector element",
            merge=_max_magnitude,
            params=(GAIN,),
            needs_base=True,
        )
    )
    yield record
    methods.unregister("max_magnitude")


@pytest.fixture()
def current1():
    record = strategies.register(
        strategies.Strategy(
            name="current/1",
            partners=2,
            roles=lambda i, picks: (i, picks[0], picks[1]),
            summary="x_i + F (x_r1 - x_r2)",
        )
    )
    yield record
    strategies.unregister("current/1")


def _expected_merge(models, base_dir, gain):
    layout = Layout.of_model(model_io.empty_model(model_io.load_config(models[0]), "sequence-classification"))
    pop = make_population("cpu", layout, [safetensors_files(m) for m in models], models, torch.device("cpu"))
    base = model_io.load_model_arena(layout, safetensors_files(base_dir), base_dir)
    ctx = methods.MergeContext(settings={"gain": gain}, base=base, chunk=1000)
    return layout, _max_magnitude(pop, Arena.empty(layout), ctx)


def _assert_model_equals(out_dir, layout, arena):
    got = load_file(os.path.join(out_dir, "model.safetensors"))
    for e in layout.entries:
        key = next(a for a in e.aliases if a in got)
        assert torch.equal(got[key], arena.view(e)), key


def test_a_new_merge_method_runs_through_merge_and_evolve(bert_pop, tmp_path, max_magnitude):
    models, dev, base_dir = bert_pop.models[:3], bert_pop.dev, bert_pop.base
    layout, want = _expected_merge(models, base_dir, 0.5)
    # merge: flag, then YAML, derived from the record
    assert (
        merge_main(
            [
                "--method",
                "max_magnitude",
                "--base",
                base_dir,
                "--models",
                *models,
                "--gain",
                "0.5",
                "--out",
                str(tmp_path / "flags"),
            ]
        )
        == 0
    )
    _assert_model_equals(tmp_path / "flags", layout, want)
    (tmp_path / "m.yaml").write_text(
        json.dumps(
            {
                "merge_method": "max_magnitude",
                "base_model": base_dir,
                "models": [{"model": m} for m in models],
                "parameters": {"gain": 0.5},
            }
        )
    )
    assert merge_main(["--config", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "yaml")]) == 0
    _assert_model_equals(tmp_path / "yaml", layout, want)
    assert json.loads((tmp_path / "yaml" / "merge.json").read_text())["gain"] == 0.5
    # evolve: --merge-method and --merge-gain; with no generation the output is the merge itself
    args = [
        "--models",
        *models,
        "--dev",
        *dev,
        "--merge-method",
        "max_magnitude",
        "--base-model",
        base_dir,
        "--merge-gain",
        "0.5",
        "--generations",
        "0",
    ]
    assert evolve_main([*args, "--out", str(tmp_path / "g0")]) == 0
    _assert_model_equals(tmp_path / "g0", layout, want)
    doc = json.loads((tmp_path / "g0" / "evolution.json").read_text())
    assert doc["config"]["merge_gain"] == 0.5 and "max_magnitude (gain 0.5)" in doc["output"]
    assert evolve_main([*args[:-2], "--generations", "1", "--out", str(tmp_path / "g1")]) == 0
    # the record's range is every front end's check
    assert (
        merge_main(
            [
                "--method",
                "max_magnitude",
                "--base",
                base_dir,
                "--models",
                *models,
                "--gain",
                "0",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert evolve_main([*args, "--merge-gain", "11", "--out", str(tmp_path / "bad2")]) == 2
    assert evolve_main([*args[:6], "--merge-gain", "2", "--out", str(tmp_path / "bad3")]) == 2  # average has no gain


def test_a_new_strategy_runs_through_evolve(bert_pop, tmp_path, current1, monkeypatch):
    """Every offspring is accepted (a fitness that grows with each evaluation); in the synchronous schedule the
    output is then individual n-1's offspring, built from the initial population with the strategy's roles."""
    models, dev = bert_pop.models[:3], bert_pop.dev
    (tmp_path / "counting.py").write_text(
        "calls = [0]\ndef fitness(model, tokenizer, dev_paths, device):\n    calls[0] += 1\n    return float(calls[0])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = [
        "--models",
        *models,
        "--dev",
        *dev,
        "--strategy",
        "current/1",
        "--fitness",
        "individual",
        "--schedule",
        "synchronous",
        "--generations",
        "1",
        "--seed",
        "3",
        "--task",
        "counting:fitness",
    ]
    sys.modules.pop("counting", None)
    assert evolve_main([*args, "--out", str(tmp_path / "o")]) == 0
    doc = json.loads((tmp_path / "o" / "evolution.json").read_text())
    assert doc["generations"][1]["accepted"] == [0, 1, 2] and "#2" in doc["output"]
    layout = Layout.of_model(model_io.empty_model(model_io.load_config(models[0]), "sequence-classification"))
    pop = make_population("cpu", layout, [safetensors_files(m) for m in models], models, torch.device("cpu"))
    spec = strategies.offspring_spec("current/1", 0.5, 0.5, 3, 3, 1, 2, [1.0, 2.0, 3.0])
    assert spec.roles() == (2, spec.picks[0], spec.picks[1]) and 2 not in spec.picks
    want = Arena.empty(layout)
    WeightPipeline(pop, "cpu").offspring_into(spec, want)
    _assert_model_equals(tmp_path / "o", layout, want)
    # the record decides the population check: i and two partners
    assert strategies.get("current/1").min_population == 3
    assert evolve_main([*args[:2], *args[4:], "--models", *models[:2], "--out", str(tmp_path / "x")]) == 2


def test_unknown_strategy_and_method_come_from_the_registries(bert_pop, tmp_path, capsys):
    models, dev = bert_pop.models[:3], bert_pop.dev
    with pytest.raises(SystemExit):
        evolve_main(["--models", *models, "--dev", *dev, "--out", str(tmp_path / "o"), "--strategy", "current/9"])
    assert "invalid choice: 'current/9'" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("merge_method: no_such_method\n")
    assert (
        evolve_main(
            ["--config", str(tmp_path / "c.yaml"), "--models", *models, "--dev", *dev, "--out", str(tmp_path / "o")]
        )
        == 2
    )
    # every method is a choice (--search recipe searches those a population merge cannot use)
    assert f"merge_method must be one of {', '.join(methods.names())}, got 'no_such_method'" in capsys.readouterr().err


def test_help_of_both_commands_lists_every_registered_method_and_parameter(max_magnitude):
    from evolver_kernels.evolve.config import build_parser
    from evolver_kernels.merge.cli import build_parser as merge_parser

    evolve_help, merge_help = build_parser().format_help(), merge_parser().format_help()
    for name in methods.all_params():
        assert f"--merge-{name.replace('_', '-')}" in evolve_help and f"--{name.replace('_', '-')} " in merge_help
    assert "--merge-gain" in evolve_help and "max_magnitude" in merge_help and "--gain" in merge_help


def test_docs_method_table_is_the_registrys():
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "merge.md")) as f:
        page = f.read()
    assert methods.markdown_table() in page, "docs/merge.md: regenerate the method table from methods.markdown_table()"


def test_registry_refuses_a_parameter_that_means_two_things():
    clash = methods.Param("density", float, 0.3, "another density", low=0.0, high=1.0)
    with pytest.raises(ValueError, match="parameter density differs"):
        methods.register(methods.MergeMethod(name="clash", summary="", merge=_max_magnitude, params=(clash,)))
    assert "clash" not in methods.names()
    with pytest.raises(ValueError, match="registered already"):
        methods.register(methods.MergeMethod(name="linear", summary="", merge=_max_magnitude))


SEEDED_FITNESS = """
import torch
from safetensors.torch import load_file
target = load_file({path!r})
def closeness(model, tokenizer, dev_paths, device):
    return -sum(float((p.detach().float() - target[n]).abs().sum()) for n, p in model.named_parameters() if n in target)
"""


def test_population_size_adds_seeded_individuals(bert_pop, tmp_path, monkeypatch):
    """--population-size 4 with 2 models: slots 2 and 3 are evolver-strategy offspring of models 0 and 1 with a
    random partner (evolve.py's docstring). A fitness that is highest exactly at slot 3's weights makes the run
    output slot 3: its bytes are the seeding rule's."""
    from evolver_kernels.evolve.strategies import OffspringSpec
    from evolver_kernels.kernels.rng import PURPOSE_OFFSPRING, derive_seed, random_order

    models, dev, seed = bert_pop.models[:2], bert_pop.dev, 11
    layout = Layout.of_model(model_io.empty_model(model_io.load_config(models[0]), "sequence-classification"))
    pop = make_population("cpu", layout, [safetensors_files(m) for m in models], models, torch.device("cpu"))
    partner = next(k for k in random_order(seed, 2, 0, 3) if k != 1)
    spec = OffspringSpec(
        i=1, strategy="evolver", picks=(partner,), F=0.5, CR=0.5, seed=derive_seed(seed, 0, 3, PURPOSE_OFFSPRING)
    )
    want = Arena.empty(layout)
    WeightPipeline(pop, "cpu").offspring_into(spec, want)
    from safetensors.torch import save_file

    save_file({e.name: want.view(e).float().contiguous() for e in layout.entries}, str(tmp_path / "target.safetensors"))
    (tmp_path / "seeded.py").write_text(SEEDED_FITNESS.format(path=str(tmp_path / "target.safetensors")))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("seeded", None)
    args = [
        "--models",
        *models,
        "--dev",
        *dev,
        "--fitness",
        "individual",
        "--population-size",
        "4",
        "--generations",
        "0",
        "--seed",
        str(seed),
        "--task",
        "seeded:closeness",
    ]
    assert evolve_main([*args, "--out", str(tmp_path / "a")]) == 0
    doc = json.loads((tmp_path / "a" / "evolution.json").read_text())
    fits = doc["generations"][0]["population_fitness"]
    assert len(fits) == 4 and fits[3] == 0.0 and min(fits[:3]) < 0 and "#3" in doc["output"]
    assert "seeded offspring of" in doc["output"]
    _assert_model_equals(tmp_path / "a", layout, want)
