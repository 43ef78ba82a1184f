"""`--search recipe` (evolve/recipe.py, evolve/genome.py): CMA-ES over merge recipes per layer group and model.
Deterministic from the seed, resumed bit for bit after a kill -9, the same bytes under torchrun, its recipe.yaml
giving the output's bytes through the merge CLI and mergekit's tensors, --max-evaluations honoured by both
searches, bad options refused in one line."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from _util import KILL_RUN, MERGEKIT_ATOL, MERGEKIT_RTOL, finish, run_evolve, run_mergekit, torchrun
from safetensors.torch import load_file

from evolver_kernels.evolve import main
from evolver_kernels.merge import main as merge_main

RECIPE = ["--search", "recipe", "--layer-groups", "2", "--population-size", "4", "--generations", "2", "--seed", "11"]


def _args(pop, out, *extra, method="ties"):
    models = pop.models[:2] if method == "slerp" else pop.models[:3]
    base = ["--base-model", pop.base] if method != "slerp" else []
    return ["--models", *models, "--dev", *pop.dev, *base, "--out", str(out), "--merge-method", method, *RECIPE, *extra]


def _bytes(out) -> bytes:
    with open(os.path.join(out, "model.safetensors"), "rb") as f:
        return f.read()


def _doc(out) -> dict:
    with open(os.path.join(out, "evolution.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def straight(bert_pop, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "straight"
    run_evolve(_args(bert_pop, out))
    return out


def test_recipe_search_end_to_end(straight):
    doc = _doc(straight)
    assert doc["config"]["search"] == "recipe" and doc["evaluations"] == 1 + 2 * 4
    assert [len(g["population_fitness"]) for g in doc["generations"]] == [1, 4, 4]
    recipe = doc["recipe"]
    assert recipe["candidates_scored"] == 9 and recipe["candidates_per_generation"] == 4
    # 2 groups x 3 models x (weight, density)
    assert len(recipe["genome"]) == len(recipe["genes"]) == 12 and recipe["genes"][1] == "group 0 model 0 density"
    everything = [s for g in doc["generations"] for s in g["population_fitness"]]
    assert recipe["dev_fitness"] == max(everything) == doc["final_fitness"]
    assert doc["generations"][-1]["best"] == max(everything)
    assert "best recipe" in doc["output"] and os.path.isfile(straight / "recipe.yaml")
    with open(straight / "README.md") as f:
        assert "CMA-ES search of merge recipes" in f.read()
    # every candidate within the registry's search intervals
    weights, densities = recipe["genome"][0::2], recipe["genome"][1::2]
    assert all(0 <= w <= 1 for w in weights) and all(0.01 <= d <= 1 for d in densities)


def test_recipe_search_is_deterministic_from_the_seed(straight, bert_pop, tmp_path):
    run_evolve(_args(bert_pop, tmp_path / "again"))
    assert _bytes(tmp_path / "again") == _bytes(straight)
    assert _doc(tmp_path / "again")["generations"] == _doc(straight)["generations"]
    assert (tmp_path / "again" / "recipe.yaml").read_text().split("\n", 1)[1] == (
        straight / "recipe.yaml"
    ).read_text().split("\n", 1)[1].replace(str(straight), str(tmp_path / "again"))
    other = _args(bert_pop, tmp_path / "other")
    other[other.index("--seed") + 1] = "12"
    run_evolve(other)
    first = [g["population_fitness"] for g in _doc(straight)["generations"]]
    assert [g["population_fitness"] for g in _doc(tmp_path / "other")["generations"]][0] == first[0]  # the start
    assert _doc(tmp_path / "other")["recipe"]["genome"] != _doc(straight)["recipe"]["genome"]


@pytest.mark.parametrize("method", ["ties", "slerp"])
def test_recipe_yaml_gives_the_outputs_bytes_and_mergekits_tensors(straight, bert_pop, tmp_path, method):
    out = straight
    if method != "ties":
        out = tmp_path / method
        run_evolve(_args(bert_pop, out, method=method))
    assert merge_main(["--config", str(out / "recipe.yaml"), "--out", str(tmp_path / "merged")]) == 0
    assert _bytes(tmp_path / "merged") == _bytes(out)
    import yaml

    run_mergekit(tmp_path, {"recipe": yaml.safe_load((out / "recipe.yaml").read_text())})
    ours = load_file(os.path.join(out, "model.safetensors"))
    theirs = load_file(os.path.join(tmp_path, "recipe-mergekit", "model.safetensors"))
    assert set(theirs) <= set(ours)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name].float(), tensor.float(), rtol=MERGEKIT_RTOL, atol=MERGEKIT_ATOL, msg=name)


@pytest.mark.slow
def test_recipe_search_resumes_bit_exact_after_a_kill(straight, bert_pop, tmp_path):
    """Killed at the 7th evaluation (generation 2, candidate 1): --resume rebuilds CMA-ES by asking and telling
    again, and ends with the bytes and the history of the uninterrupted run."""
    args = _args(bert_pop, tmp_path / "k")
    killed = subprocess.run(
        [sys.executable, KILL_RUN, "evaluate", "6", "--", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "EVOLVER_PROGRESS": "0"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = json.loads((tmp_path / "k" / "checkpoint" / "state.json").read_text())
    assert state["generation"] == 2 and state["position"] == 1 and len(state["recipe"]) == 6
    assert main([*args, "--resume"]) == 0
    assert _bytes(tmp_path / "k") == _bytes(straight)
    assert _doc(tmp_path / "k")["generations"] == _doc(straight)["generations"]
    assert _doc(tmp_path / "k")["recipe"] == _doc(straight)["recipe"]


def test_resume_refuses_a_checkpoint_cma_would_not_ask(bert_pop, tmp_path, capsys):
    args = _args(bert_pop, tmp_path / "k", "--max-evaluations", "7")
    run_evolve(args)
    state_path = tmp_path / "k" / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    state.update(finished=False, generation=2, position=1, history=state["history"][:2])
    state["recipe"] = state["recipe"][:6]
    state["recipe"][5]["genome"][0] = 0.5
    state_path.write_text(json.dumps(state))
    os.remove(tmp_path / "k" / "evolution.json")  # as if the run had stopped before writing its outputs
    assert main([*args, "--resume"]) == 2
    assert "CMA-ES asks other candidates in generation 2 than the checkpoint records" in capsys.readouterr().err


@pytest.mark.slow
def test_recipe_search_under_torchrun_gives_the_bytes_of_one_process(straight, bert_pop, tmp_path):
    """Each of 2 ranks scores its share of every generation; the output and history are one process's."""
    err = finish(torchrun(_args(bert_pop, tmp_path / "ranks"), tmp_path / "shm", 2))
    assert "candidates per generation" in err
    assert _bytes(tmp_path / "ranks") == _bytes(straight)
    assert _doc(tmp_path / "ranks")["generations"] == _doc(straight)["generations"]


def test_max_evaluations_stops_the_recipe_search_within_a_generation(bert_pop, tmp_path):
    doc = run_evolve(_args(bert_pop, tmp_path / "r", "--max-evaluations", "7"))
    assert doc["evaluations"] == 7 and doc["config"]["max_evaluations"] == 7
    assert [len(g["population_fitness"]) for g in doc["generations"]] == [1, 4, 2]
    assert doc["recipe"]["candidates_scored"] == 7


@pytest.mark.parametrize(
    "fitness,schedule,budget,spent",
    [
        ("individual", "sequential", 6, 6),  # 4 initial, then 2 offspring of generation 1
        ("merged", "sequential", 6, 6),  # 1 initial, 4 offspring, 1 of generation 2
        ("individual", "synchronous", 7, 7),
        ("merged", "synchronous", 5, 5),  # the last one kept for scoring accepted offspring together
    ],
)
def test_max_evaluations_stops_the_weights_search(bert_pop, tmp_path, fitness, schedule, budget, spent):
    args = ["--models", *bert_pop.models, "--dev", *bert_pop.dev, "--out", str(tmp_path / "w"), "--seed", "7"]
    args += ["--fitness", fitness, "--schedule", schedule, "--generations", "3", "--max-evaluations", str(budget)]
    doc = run_evolve(args)
    assert doc["evaluations"] <= budget and doc["evaluations"] >= spent - (schedule == "synchronous")
    assert doc["config"]["max_evaluations"] == budget
    if schedule == "sequential":
        assert doc["evaluations"] == spent


def test_dry_run_shows_the_genome(bert_pop, tmp_path, capsys):
    assert main([*_args(bert_pop, tmp_path / "d"), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "recipe genome: 12 genes = 2 layer group(s) of 1 layers" in err and "4 candidates per generation" in err
    assert "the models (read only): 3 copies" in err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--layer-groups", "3"], "--layer-groups 3 does not divide the models' 2 layers into equal groups"),
        (["--merge-density", "0.5"], "--merge-density: --search recipe searches density (per layer group and model"),
        (["--fitness", "individual"], "--fitness applies to --search weights (Evolver)"),
        (["--strategy", "rand/1"], "--strategy applies to --search weights"),
        (["--merge-method", "fisher"], "merges with statistics of whole models"),
        (["--merge-method", "slerp"], "slerp merges at least 2 and at most 2 models, got 3"),
        (["--population-size", "1"], "CMA-ES needs at least 2 candidates per generation"),
        (["--sigma0", "0"], "--sigma0 must be in (0, 1]"),
        (["--max-evaluations", "0"], "--max-evaluations must be a positive integer"),
    ],
)
def test_bad_recipe_options_are_refused_in_one_line(bert_pop, tmp_path, capsys, extra, message):
    args = _args(bert_pop, tmp_path / "o", *extra)
    if "--merge-method" in extra:  # the later --merge-method wins; no base for slerp
        args = [a for a in args if a not in ("--base-model", bert_pop.base)] if "slerp" in extra else args
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--layer-groups", "2"], "--layer-groups applies to --search recipe"),
        (["--sigma0", "0.2"], "--sigma0 applies to --search recipe"),
        (["--fitness", "individual", "--max-evaluations", "3"], "--max-evaluations 3 is fewer than the 4 evaluations"),
        (["--merge-method", "slerp"], "cannot merge a population"),
    ],
)
def test_options_of_the_recipe_search_are_refused_by_the_weights_search(bert_pop, tmp_path, capsys, extra, message):
    args = ["--models", *bert_pop.models, "--dev", *bert_pop.dev, "--out", str(tmp_path / "o"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_recipe_search_from_every_tier_gives_the_same_bytes(straight, bert_pop, tmp_path, tier):
    run_evolve(_args(bert_pop, tmp_path / tier, "--population-on", tier))
    assert _bytes(tmp_path / tier) == _bytes(straight)
    assert not [n for n in os.listdir(tmp_path / tier) if n.startswith("evolver-scratch-")]


def test_recipe_search_of_a_causal_lm(llama_pop, tmp_path):
    args = ["--models", *llama_pop.models, "--dev", *llama_pop.dev, "--base-model", llama_pop.base]
    args += ["--search", "recipe", "--merge-method", "task_arithmetic", "--out", str(tmp_path / "lm")]
    args += ["--population-size", "3", "--generations", "1", "--max-evaluations", "3", "--seed", "2"]
    doc = run_evolve(args)
    assert doc["task"] == "causal-lm" and doc["evaluations"] == 3
    assert merge_main(["--config", str(tmp_path / "lm" / "recipe.yaml"), "--out", str(tmp_path / "m")]) == 0
    assert _bytes(tmp_path / "m") == _bytes(tmp_path / "lm")


def test_recipe_search_with_held_out_selection(bert_pop, tmp_path):
    doc = run_evolve(_args(bert_pop, tmp_path / "s", "--select-fraction", "0.25", "--max-evaluations", "5"))
    names = [c["name"] for c in doc["selection"]["candidates"]]
    assert names == ["the run's result", *(f"input model {m}" for m in bert_pop.models[:3])]
    assert doc["selection"]["chosen"] in names
