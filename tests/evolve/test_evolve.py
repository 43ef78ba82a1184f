"""The driver end to end on tiny models built from configs: every task type, both fitness modes and
schedules, determinism, resume after a kill -9, storage tiers and backends giving the same bytes."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from _util import KILL_RUN, run_evolve
from safetensors.torch import load_file

from evolver_kernels.evolve import main
from evolver_kernels.testing import tiny_models


def _run(models, dev, out, *extra):
    argv = ["--models", *models, "--dev", *dev, "--out", str(out), "--generations", "2", "--seed", "7", *extra]
    return run_evolve(argv)


def _weights(out):
    return load_file(os.path.join(out, "model.safetensors"))


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(
        torch.equal(wa[k].view(-1).view(torch.uint8), wb[k].view(-1).view(torch.uint8)) for k in wa
    )


def _check_outputs(out, auto_class):
    import transformers

    with open(os.path.join(out, "evolution.json")) as f:
        doc = json.load(f)
    assert {"config", "generations", "final_fitness"} <= set(doc)
    assert [g["generation"] for g in doc["generations"]] == list(range(len(doc["generations"])))
    assert all({"generation", "population_fitness", "accepted"} <= set(g) for g in doc["generations"])
    assert os.path.getsize(os.path.join(out, "fitness.png")) > 1000
    with open(os.path.join(out, "README.md")) as f:
        assert "Final dev fitness" in f.read()
    model = getattr(transformers, auto_class).from_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return doc


@pytest.mark.parametrize(
    "fitness,schedule",
    [("merged", "sequential"), ("individual", "synchronous"), ("individual", "sequential"), ("merged", "synchronous")],
)
def test_sequence_classification_end_to_end(bert_pop, tmp_path, fitness, schedule):
    models, dev = bert_pop
    doc = _run(models, dev, tmp_path / "out", "--fitness", fitness, "--schedule", schedule, "--metric", "macro-f1")
    doc = _check_outputs(tmp_path / "out", "AutoModelForSequenceClassification")
    assert len(doc["generations"]) == 3 and doc["metric"] == "macro-f1"
    if fitness == "individual":
        # per-individual fitness never decreases, and the output is the best individual
        for before, after in zip(doc["generations"], doc["generations"][1:]):
            assert all(b >= a for a, b in zip(before["population_fitness"], after["population_fitness"]))
        assert doc["final_fitness"] == pytest.approx(max(doc["generations"][-1]["population_fitness"]))
    else:
        fits = [g["population_fitness"] for g in doc["generations"]]
        assert fits == sorted(fits)
        assert doc["final_fitness"] == pytest.approx(fits[-1])
    assert sorted(doc["final_per_file"]) == ["dev0.jsonl", "dev1.jsonl"]


@pytest.mark.parametrize("strategy", ["rand/1", "best/1"])
def test_strategies_rand1_and_best1(bert_pop, tmp_path, strategy):
    """Each strategy runs end to end: per-individual fitness never decreases, something is accepted, and the
    result is its own (another strategy from the same seed gives other bytes)."""
    models, dev = bert_pop
    doc = _run(models, dev, tmp_path / "s", "--strategy", strategy, "--fitness", "individual")
    _check_outputs(tmp_path / "s", "AutoModelForSequenceClassification")
    for before, after in zip(doc["generations"], doc["generations"][1:]):
        assert all(b >= a for a, b in zip(before["population_fitness"], after["population_fitness"]))
    assert sum(len(g["accepted"]) for g in doc["generations"]) > 0
    _run(models, dev, tmp_path / "e", "--strategy", "evolver", "--fitness", "individual")
    assert not _same_weights(tmp_path / "s", tmp_path / "e")


def test_same_seed_same_bytes_on_every_tier_and_backend(bert_pop, tmp_path):
    models, dev = bert_pop
    a = _run(models, dev, tmp_path / "a", "--fitness", "individual")
    assert sum(len(g["accepted"]) for g in a["generations"]) > 0, "the test population must accept something"
    _run(
        models,
        dev,
        tmp_path / "b",
        "--fitness",
        "individual",
        "--population-on",
        "cpu",
        "--backend",
        "reference",
        "--chunk-elements",
        "4096",
    )
    assert _same_weights(tmp_path / "a", tmp_path / "b")
    _run(models, dev, tmp_path / "d", "--fitness", "individual", "--population-on", "disk", "--chunk-elements", "1024")
    assert _same_weights(tmp_path / "a", tmp_path / "d")
    import evolver_kernels as ek

    if "triton" in ek.available_backends("cpu"):  # under the interpreter on a CPU-only machine
        _run(models, dev, tmp_path / "t", "--fitness", "individual", "--backend", "triton")
        assert _same_weights(tmp_path / "a", tmp_path / "t")
    _run(models, dev, tmp_path / "c", "--fitness", "individual", "--seed", "8")
    assert not _same_weights(tmp_path / "a", tmp_path / "c")


@pytest.mark.parametrize(
    "kind,auto,extra",
    [
        ("gpt2", "AutoModelForCausalLM", ["--fitness", "individual"]),
        ("llama", "AutoModelForCausalLM", ["--schedule", "synchronous"]),
        ("t5", "AutoModelForSeq2SeqLM", ["--fitness", "individual"]),
        ("t5", "AutoModelForSeq2SeqLM", ["--metric", "exact-match"]),
    ],
)
def test_generative_tasks_end_to_end(tmp_path, kind, auto, extra):
    models = tiny_models.make_population(kind, str(tmp_path), 3, noise=0.1)
    rows = tiny_models.seq2seq_rows(24, 1) if kind == "t5" else tiny_models.lm_rows(24, 1)
    dev = [tiny_models.write_jsonl(str(tmp_path / "dev.jsonl"), rows)]
    doc = _run(models, dev, tmp_path / "out", *extra)
    _check_outputs(tmp_path / "out", auto)
    expected_task = "seq2seq" if kind == "t5" else "causal-lm"
    assert doc["task"] == expected_task
    if doc["metric"] == "neg-loss":
        assert doc["final_fitness"] < 0


def test_multilabel_classification(tmp_path):
    models = tiny_models.make_population("roberta", str(tmp_path), 2, num_labels=4, multi_label=True)
    rows = [
        {"text": r["text"], "label": [int(c in (r["label"], 3)) for c in range(4)]}
        for r in tiny_models.sentiment_rows(32, 3)
    ]
    dev = [tiny_models.write_jsonl(str(tmp_path / "dev.jsonl"), rows)]
    # the tiny heads' sigmoids sit below 0.5: a low threshold makes labels predicted, so F1 can move
    doc = _run(models, dev, tmp_path / "out", "--threshold", "0.05", "--fitness", "individual")
    assert doc["metric"] == "multilabel-f1"
    # the recorded fitness is the output model's multi-label F1, scored independently from its directory
    import transformers

    from evolver_kernels.evaluation.evaluator import Evaluator

    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    report = Evaluator(
        "sequence-classification", tokenizer, dev, config=model.config, threshold=0.05
    ).classification_report(model)
    assert doc["final_fitness"] == pytest.approx(report[dev[0]]["multilabel-f1"], abs=1e-12)
    assert 0 < doc["final_fitness"] <= 1


def test_yaml_config_with_flag_override(bert_pop, tmp_path):
    import yaml

    models, dev = bert_pop
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "models": models,
                "dev": dev,
                "out": str(tmp_path / "out"),
                "generations": 5,
                "fitness": "individual",
                "population-on": "cpu",
            }
        )
    )
    assert main(["--config", str(cfg), "--generations", "1"]) == 0
    doc = json.loads((tmp_path / "out" / "evolution.json").read_text())
    assert doc["config"]["generations"] == 1 and doc["config"]["population_on"] == "cpu"


def test_help_lists_every_pinned_flag_with_defaults():
    out = subprocess.run([sys.executable, "-m", "evolver_kernels.evolve", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in [
        "--models",
        "--dev",
        "--task",
        "--out",
        "--generations",
        "--population-size",
        "--strategy",
        "--fitness",
        "--schedule",
        "--F",
        "--CR",
        "--seed",
        "--population-on",
        "--device",
        "--resume",
        "--config",
    ]:
        assert flag in out.stdout, flag
    assert "(default: 0.5)" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "fitness,schedule,kill_after,tier,extra",
    [
        ("individual", "sequential", 7, "gpu", []),
        ("merged", "sequential", 5, "cpu", []),
        ("merged", "synchronous", 6, "gpu", []),
        ("individual", "synchronous", 9, "gpu", []),
        ("merged", "sequential", 8, "disk", []),
        ("individual", "sequential", 6, "disk", []),
        # jDE's F and CR are in the checkpoint; killed in generation 2, then while choosing on the selection data
        ("individual", "sequential", 11, "gpu", ["--adapt", "jde", "--seed", "3", "--select-fraction", "0.25"]),
        ("individual", "sequential", 18, "gpu", ["--adapt", "jde", "--seed", "3", "--select-fraction", "0.25"]),
    ],
)
def test_resume_after_kill_gives_the_same_bytes(bert_pop, tmp_path, fitness, schedule, kill_after, tier, extra):
    models, dev = bert_pop
    args = [
        "--models",
        *models,
        "--dev",
        *dev,
        "--generations",
        "3",
        "--seed",
        "11",
        "--fitness",
        fitness,
        "--schedule",
        schedule,
        "--population-on",
        tier,
        *extra,
    ]
    _run(models, dev, tmp_path / "straight", *args[args.index("--generations") :])
    killed = subprocess.run(
        [sys.executable, KILL_RUN, "evaluate", str(kill_after), "--", *args, "--out", str(tmp_path / "k")],
        capture_output=True,
        text=True,
        env={**os.environ, "EVOLVER_PROGRESS": "0"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "k" / "evolution.json").exists()
    assert main([*args, "--out", str(tmp_path / "k"), "--resume"]) == 0
    assert _same_weights(tmp_path / "straight", tmp_path / "k")
    straight = json.loads((tmp_path / "straight" / "evolution.json").read_text())
    resumed = json.loads((tmp_path / "k" / "evolution.json").read_text())
    assert straight["generations"] == resumed["generations"]
    assert straight["final_fitness"] == resumed["final_fitness"]


def test_sequential_schedule_refuses_several_ranks(bert_pop, tmp_path, monkeypatch, capsys):
    from evolver_kernels import distributed

    models, dev = bert_pop
    monkeypatch.setattr(distributed.Ranks, "from_env", staticmethod(lambda device_type: distributed.Ranks(0, 2)))
    assert main(["--models", *models, "--dev", *dev, "--out", str(tmp_path / "o")]) == 2
    assert "2 ranks need --schedule synchronous" in capsys.readouterr().err


@pytest.mark.parametrize(
    "method,extra,kw",
    [
        ("ties", ["--merge-density", "0.4"], {"density": 0.4}),
        ("dare_linear", ["--merge-scale", "0.5", "--merge-drop-p", "0.3"], {"scale": 0.5, "drop_p": 0.3}),
        ("task_arithmetic", [], {}),
    ],
)
def test_merged_fitness_with_other_merge_methods(bert_pop, tmp_path, method, extra, kw):
    from evolver_kernels.io import model_io
    from evolver_kernels.kernels.rng import PURPOSE_MERGE, derive_seed
    from evolver_kernels.methods.merger import Merger
    from evolver_kernels.storage.arena import Arena, Layout, safetensors_files
    from evolver_kernels.storage.population import make_population

    models, dev = bert_pop
    base_dir = os.path.join(os.path.dirname(models[0]), "bert-base")
    args = ["--merge-method", method, "--base-model", base_dir, *extra]
    doc = _run(models, dev, tmp_path / "m", *args)
    fits = [g["population_fitness"] for g in doc["generations"]]
    assert fits == sorted(fits) and doc["final_fitness"] == pytest.approx(fits[-1])
    assert method in doc["output"]
    _run(models, dev, tmp_path / "m2", *args)
    assert _same_weights(tmp_path / "m", tmp_path / "m2")

    # with no generation, the output is exactly the merge of the models, as methods.merger.Merger computes it
    _run(models, dev, tmp_path / "g0", *args, "--generations", "0")
    layout = Layout.of_model(model_io.empty_model(model_io.load_config(models[0]), "sequence-classification"))
    pop = make_population("cpu", layout, [safetensors_files(m) for m in models], models, torch.device("cpu"))
    base = make_population("cpu", layout, [safetensors_files(base_dir)], [base_dir], torch.device("cpu")).arenas[0]
    want = Merger(method, base, seed=derive_seed(7, 0, 0, PURPOSE_MERGE), **kw)(pop, Arena.empty(layout))
    got = load_file(os.path.join(tmp_path / "g0", "model.safetensors"))
    for e in layout.entries:
        key = next(a for a in e.aliases if a in got)
        assert torch.equal(got[key], want.view(e)), key


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_fisher_and_regmean_merged_fitness_resume_exactly(bert_pop, tmp_path, method):
    """Statistics estimated once on the dev data, kept with the checkpoint: a run killed after them resumes
    to the same bytes as a straight run; the merge differs from the plain average."""
    models, dev = bert_pop
    args = [
        "--models",
        *models,
        "--dev",
        *dev,
        "--generations",
        "2",
        "--seed",
        "5",
        "--merge-method",
        method,
        "--merge-examples",
        "24",
        *(["--merge-alpha", "0.7"] if method == "regmean" else []),
    ]
    doc = _run(models, dev, tmp_path / "straight", *args[args.index("--merge-method") :], "--seed", "5")
    fits = [g["population_fitness"] for g in doc["generations"]]
    assert fits == sorted(fits)
    assert ("Fisher" if method == "fisher" else "RegMean") in doc["output"]
    assert not [f for f in os.listdir(tmp_path / "straight" / "checkpoint") if f.endswith("-stats.safetensors")]
    killed = subprocess.run(
        [sys.executable, KILL_RUN, "evaluate", "3", "--", *args, "--out", str(tmp_path / "k")],
        capture_output=True,
        text=True,
        env={**os.environ, "EVOLVER_PROGRESS": "0"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert os.path.isfile(tmp_path / "k" / "checkpoint" / f"{method}-stats.safetensors")
    assert main([*args, "--out", str(tmp_path / "k"), "--resume"]) == 0
    assert _same_weights(tmp_path / "straight", tmp_path / "k")
    _run(models, dev, tmp_path / "avg", "--generations", "0")
    _run(models, dev, tmp_path / "g0", *args[args.index("--merge-method") :], "--generations", "0")
    avg, got = _weights(tmp_path / "avg"), _weights(tmp_path / "g0")
    assert not torch.equal(
        avg["bert.encoder.layer.0.attention.self.query.weight"], got["bert.encoder.layer.0.attention.self.query.weight"]
    )
    if method == "regmean":  # only linear weights are solved for; the rest is the average
        assert torch.equal(avg["bert.embeddings.word_embeddings.weight"], got["bert.embeddings.word_embeddings.weight"])


CLOSENESS = """
from safetensors.torch import load_file
target = load_file({path!r})
def closeness(model, tokenizer, dev_paths, device):
    return -sum(float((p.detach().float() - target[n]).abs().sum()) for n, p in model.named_parameters() if n in target)
"""


def test_extra_individuals_join_the_population(bert_pop, tmp_path, monkeypatch):
    """--extra-individuals average ties: two more individuals, exactly those merges of the models. A fitness that
    is highest exactly at the TIES merge makes the run output that extra individual: its bytes are checked."""
    import sys

    from safetensors.torch import save_file

    from evolver_kernels.io import model_io
    from evolver_kernels.methods.merger import Merger
    from evolver_kernels.storage.arena import Arena, Layout, safetensors_files
    from evolver_kernels.storage.population import make_population

    models, dev = bert_pop
    base_dir = os.path.join(os.path.dirname(models[0]), "bert-base")
    layout = Layout.of_model(model_io.empty_model(model_io.load_config(models[0]), "sequence-classification"))
    pop = make_population("cpu", layout, [safetensors_files(m) for m in models[:2]], models[:2], torch.device("cpu"))
    base = model_io.load_model_arena(layout, safetensors_files(base_dir), base_dir)
    want = Merger("ties", base, density=0.3)(pop, Arena.empty(layout))
    save_file({e.name: want.view(e).float().contiguous() for e in layout.entries}, str(tmp_path / "ties.safetensors"))
    (tmp_path / "to_ties.py").write_text(CLOSENESS.format(path=str(tmp_path / "ties.safetensors")))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("to_ties", None)
    args = [
        "--fitness",
        "individual",
        "--extra-individuals",
        "average",
        "ties",
        "--base-model",
        base_dir,
        "--merge-density",
        "0.3",
    ]
    doc = _run(models[:2], dev, tmp_path / "g0", *args, "--generations", "0", "--task", "to_ties:closeness")
    fits = doc["generations"][0]["population_fitness"]
    assert len(fits) == 4 and fits[3] == 0.0 and max(fits[:3]) < 0
    assert "#3, from the ties extra individual" in doc["output"]
    got = _weights(tmp_path / "g0")
    for e in layout.entries:
        key = next(a for a in e.aliases if a in got)
        assert torch.equal(got[key], want.view(e)), key
    evolved = _run(models[:2], dev, tmp_path / "g2", *args, "--strategy", "rand/1")
    assert len(evolved["generations"][-1]["population_fitness"]) == 4
    assert min(evolved["generations"][-1]["population_fitness"]) >= min(evolved["generations"][0]["population_fitness"])


def test_extra_individuals_errors(bert_pop, tmp_path, capsys):
    models, dev = bert_pop
    base = ["--models", *models, "--dev", *dev, "--out", str(tmp_path / "o")]
    assert main([*base, "--extra-individuals", "ties"]) == 2
    assert "--extra-individuals ties needs --base-model" in capsys.readouterr().err
    assert main([*base, "--extra-individuals", "average", "average"]) == 2
    assert "lists a merge twice" in capsys.readouterr().err
    assert main([*base, "--extra-individuals", "average", "--population-size", "4"]) == 2
    assert "--population-size 4 is smaller than the 4 models plus 1 extra" in capsys.readouterr().err
    assert main([*base, "--merge-method", "regmean", "--merge-alpha", "1.5"]) == 2
    assert "--merge-alpha must be in [0, 1]" in capsys.readouterr().err


BERT_MAP = {
    "bert.embeddings": "cpu",
    "bert.encoder.layer.0": "cpu",
    "bert.encoder.layer.1": "cpu",
    "bert.pooler": "cpu",
    "classifier": "cpu",
}


@pytest.mark.parametrize("fitness", ["merged", "individual"])
def test_device_map_places_the_evaluation_model_in_segments_with_the_same_bytes(bert_pop, tmp_path, fitness):
    """A --device-map splits the evaluation arena into one segment per placed module (here all on the CPU, so
    CI exercises the placed path: chunking at segment boundaries, hooks, per-segment kernels); the run gives
    the bytes of an unplaced run."""
    models, dev = bert_pop
    (tmp_path / "map.json").write_text(json.dumps(BERT_MAP))
    args = ["--fitness", fitness, "--population-on", "cpu", "--chunk-elements", "1024"]
    plain = _run(models, dev, tmp_path / "plain", *args)
    placed = _run(models, dev, tmp_path / "placed", *args, "--device-map", str(tmp_path / "map.json"))
    assert _same_weights(tmp_path / "plain", tmp_path / "placed")
    assert plain["generations"] == placed["generations"]


@pytest.mark.cuda
def test_device_map_over_gpu_and_cpu(bert_pop, tmp_path):
    """Layers on the GPU and on the CPU: the merge (weight arithmetic only) gives the bytes of an unplaced run;
    evolving runs end to end (fitness differs from an all-GPU run: bf16 autocast applies to the GPU layers only)."""
    models, dev = bert_pop
    mapping = dict(BERT_MAP, **{"bert.encoder.layer.0": "cuda:0", "classifier": 0})
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    placed = ["--population-on", "cpu", "--device-map", str(tmp_path / "map.json")]
    _run(models, dev, tmp_path / "plain", "--population-on", "cpu", "--device", "cpu", "--generations", "0")
    _run(models, dev, tmp_path / "placed", *placed, "--generations", "0")
    assert _same_weights(tmp_path / "plain", tmp_path / "placed")
    for fitness in ("merged", "individual"):
        _run(models, dev, tmp_path / fitness, *placed, "--fitness", fitness)
        doc = _check_outputs(tmp_path / fitness, "AutoModelForSequenceClassification")
        assert len(doc["generations"]) == 3


@pytest.mark.parametrize(
    "mapping,message",
    [
        ({"bert.nothing": "cpu"}, "the model has no module 'bert.nothing'"),
        ({"": "disk"}, "disk offload is not supported"),
        ({"": "cuda:7"}, "but torch sees"),
        ([], "must be a non-empty JSON object"),
    ],
)
def test_device_map_errors(bert_pop, tmp_path, capsys, mapping, message):
    models, dev = bert_pop
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    argv = [
        "--models",
        *models,
        "--dev",
        *dev,
        "--out",
        str(tmp_path / "o"),
        "--population-on",
        "cpu",
        "--device-map",
        str(tmp_path / "map.json"),
    ]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert main([*argv[:-4], "--device-map", str(tmp_path / "map.json")]) == 2
    assert "keep the population on cpu or disk" in capsys.readouterr().err


@pytest.mark.slow
def test_ranks_refusing_their_inputs_exit_with_the_error(bert_pop, tmp_path):
    """Under torchrun, a configuration error found after the process group is up ends each rank with code 2 and
    the message (not a SIGABRT from the interpreter's teardown)."""
    import socket

    models, dev = bert_pop
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            "-m",
            "evolver_kernels.evolve",
            "--models",
            *models,
            "--dev",
            *dev,
            "--out",
            str(tmp_path / "o"),
            "--schedule",
            "sequential",
        ],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode != 0
    assert "2 ranks need --schedule synchronous" in out.stderr
    assert "exitcode  : 2" in out.stderr and "SIGABRT" not in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize("fitness,initial", [("individual", 4), ("merged", 1)])
def test_evaluations_are_counted_with_and_without_the_progress_bar(bert_pop, tmp_path, monkeypatch, fitness, initial):
    models, dev = bert_pop
    counts = []
    for progress in ("1", "0"):
        monkeypatch.setenv("EVOLVER_PROGRESS", progress)
        doc = _run(models, dev, tmp_path / progress, "--fitness", fitness, "--generations", "1")
        counts.append(doc["evaluations"])
    assert counts == [initial + 4] * 2  # the initial population, then one offspring per individual (sequential)
