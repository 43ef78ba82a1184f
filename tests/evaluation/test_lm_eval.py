"""--task lm-eval: lm-evaluation-harness tasks as the fitness, on the tiny Llamas with local multiple-choice tasks
(YAML + JSONL written here; offline). The oracle is lm-eval itself: a model's fitness equals what
`lm_eval.simple_evaluate` reports for the same model directory, task, limit and few-shot count."""

import glob
import json
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed: pip install .[lm-eval]")

from _util import run_evolve

from evolver_kernels.evolve import main
from evolver_kernels.evolve.run import Run
from evolver_kernels.testing import tiny_models

LIMIT, BATCH = 16, 8
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{prompt}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _rows(n: int, seed: int) -> list[dict]:
    """Questions of tiny-model words with three one-word choices; the answer is the choice that repeats the
    question's last word (something a causal LM can be more or less sure of)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(tiny_models.WORDS) for _ in range(rng.randint(3, 7))]
        choices = rng.sample([w for w in tiny_models.WORDS if w != words[-1]], 2)
        answer = rng.randrange(3)
        choices.insert(answer, words[-1])
        rows.append({"question": " ".join(words), "choices": choices, "answer": answer})
    return rows


@pytest.fixture(scope="module")
def lm_tasks(tmp_path_factory) -> str:
    """A folder of two local lm-eval tasks: tiny_a (question as prompt) and tiny_b (another prompt, other data)."""
    root = tmp_path_factory.mktemp("lm_tasks")
    for name, seed, prompt in (("tiny_a", 0, "{{question}}"), ("tiny_b", 1, "{{question}} and")):
        data = tiny_models.write_jsonl(str(root / f"{name}.jsonl"), _rows(24, seed))
        (root / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, prompt=prompt))
    return str(root)


def _evolve(models, tasks_dir, out, *extra) -> dict:
    argv = [
        "--models",
        *models,
        "--task",
        "lm-eval",
        "--dev",
        tasks_dir,
        "--out",
        str(out),
        "--seed",
        "5",
        "--max-dev-examples",
        str(LIMIT),
        "--batch-size",
        str(BATCH),
        "--device",
        "cpu",
        *extra,
    ]
    return run_evolve(argv)


def _lm_eval(model_dir: str, tasks_dir: str, tasks: list[str], num_fewshot: int | None = None) -> dict:
    """lm-eval's own scores of a model directory: {task: {metric,filter: value}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir}",
        tasks=tasks,
        limit=LIMIT,
        batch_size=BATCH,
        device="cpu",
        num_fewshot=num_fewshot,
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=tasks_dir, include_defaults=False),
    )
    return results["results"]


def test_unchanged_models_score_what_lm_eval_reports(llama_pop, lm_tasks, tmp_path):
    """--generations 0: each model's fitness and per-task scores are lm-eval's for its directory (1-shot, limit)."""
    models = llama_pop.models
    doc = _evolve(
        models,
        lm_tasks,
        tmp_path / "run",
        "--generations",
        "0",
        "--fitness",
        "individual",
        "--lm-eval-tasks",
        "tiny_a",
        "tiny_b",
        "--lm-eval-metric",
        "acc_norm",
        "acc",
        "--lm-eval-weights",
        "3",
        "1",
        "--lm-eval-fewshot",
        "1",
    )
    initial = doc["generations"][0]["population_fitness"]
    for model_dir, fitness in zip(models, initial):
        ours = _lm_eval(model_dir, lm_tasks, ["tiny_a", "tiny_b"], num_fewshot=1)
        want = (3 * ours["tiny_a"]["acc_norm,none"] + ours["tiny_b"]["acc,none"]) / 4
        assert fitness == pytest.approx(want, abs=1e-12), model_dir
    best = max(range(len(models)), key=lambda i: initial[i])
    reference = _lm_eval(models[best], lm_tasks, ["tiny_a", "tiny_b"], num_fewshot=1)
    assert doc["final_per_file"] == {
        "tiny_a": reference["tiny_a"]["acc_norm,none"],
        "tiny_b": reference["tiny_b"]["acc,none"],
    }
    assert doc["metric"] == "lm-eval tiny_a acc_norm, tiny_b acc"
    assert len(set(initial)) > 1, "the tiny models should not all score alike: the test would prove little"


@pytest.mark.slow
def test_the_lm_eval_cli_prints_the_fitness_of_an_unchanged_model(llama_pop, lm_tasks, tmp_path):
    """The command line users run: `lm_eval --model hf --model_args pretrained=<dir>` on the same task and limit
    prints (and writes) the score evolve reports for that model (a subprocess: about 20 s, most of it lm-eval
    indexing its built-in tasks)."""
    model = llama_pop.models[1]
    doc = _evolve(
        [model, llama_pop.models[0]],
        lm_tasks,
        tmp_path / "run",
        "--generations",
        "0",
        "--fitness",
        "individual",
        "--lm-eval-tasks",
        "tiny_a",
    )
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={model}",
            "--tasks",
            "tiny_a",
            "--include_path",
            lm_tasks,
            "--limit",
            str(LIMIT),
            "--batch_size",
            str(BATCH),
            "--device",
            "cpu",
            "--output_path",
            str(tmp_path / "cli"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    [written] = glob.glob(str(tmp_path / "cli" / "*" / "results_*.json"))
    with open(written) as f:
        acc = json.load(f)["results"]["tiny_a"]["acc,none"]
    assert doc["generations"][0]["population_fitness"][0] == acc
    assert f"|acc     |↑  |{acc:.4f}|" in cli.stdout


@pytest.mark.parametrize("fitness", ["merged", "individual"])
def test_evolve_end_to_end_and_the_output_scores_its_fitness(llama_pop, lm_tasks, tmp_path, fitness):
    """Both fitness modes evolve with an lm-eval fitness; each generation records each task's score, and the
    written model scores, under lm-eval from its directory, exactly the final fitness."""
    doc = _evolve(
        llama_pop.models,
        lm_tasks,
        tmp_path / "run",
        "--generations",
        "2",
        "--fitness",
        fitness,
        "--lm-eval-tasks",
        "tiny_a",
        "tiny_b",
    )
    assert all(set(g["per_file"]) == {"tiny_a", "tiny_b"} for g in doc["generations"])
    assert doc["task"] == "lm-eval" and doc["metric"] == "lm-eval acc"
    assert doc["early_reject"].startswith("not applicable")
    ours = _lm_eval(str(tmp_path / "run"), lm_tasks, ["tiny_a", "tiny_b"])
    assert doc["final_per_file"] == {"tiny_a": ours["tiny_a"]["acc,none"], "tiny_b": ours["tiny_b"]["acc,none"]}
    assert doc["final_fitness"] == pytest.approx(
        (ours["tiny_a"]["acc,none"] + ours["tiny_b"]["acc,none"]) / 2, abs=1e-12
    )


def test_resume_after_an_interruption_gives_the_same_run(llama_pop, lm_tasks, tmp_path, monkeypatch):
    """Scores are a function of the weights alone, so a run interrupted mid-generation and resumed gives the
    same history and bytes as a straight one (nothing lm-eval-specific is checkpointed)."""
    args = ("--generations", "2", "--fitness", "merged", "--lm-eval-tasks", "tiny_a", "--population-on", "cpu")
    straight = _evolve(llama_pop.models, lm_tasks, tmp_path / "straight", *args)
    original, calls = Run.evaluate, []

    def interrupted(self, *a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(Run, "evaluate", interrupted)
    argv = [
        "--models",
        *llama_pop.models,
        "--task",
        "lm-eval",
        "--dev",
        lm_tasks,
        "--out",
        str(tmp_path / "k"),
        "--seed",
        "5",
        "--max-dev-examples",
        str(LIMIT),
        "--batch-size",
        str(BATCH),
        "--device",
        "cpu",
        *args,
    ]
    assert main(argv) == 130
    monkeypatch.setattr(Run, "evaluate", original)
    assert main([*argv, "--resume"]) == 0
    resumed = json.loads((tmp_path / "k" / "evolution.json").read_text())
    assert resumed["generations"] == straight["generations"]
    assert resumed["final_fitness"] == straight["final_fitness"]
    a, b = (
        load_file(str(tmp_path / "straight" / "model.safetensors")),
        load_file(str(tmp_path / "k" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dry_run_plans_the_scoring_logits(llama_pop, lm_tasks, tmp_path, capsys):
    """The memory plan counts a batch of logits and their log-softmax (batch x --max-length x vocab, fp32)."""
    argv = [
        "--models",
        *llama_pop.models,
        "--task",
        "lm-eval",
        "--dev",
        lm_tasks,
        "--lm-eval-tasks",
        "tiny_a",
        "--out",
        str(tmp_path / "out"),
        "--batch-size",
        "4",
        "--max-length",
        "64",
        "--dry-run",
    ]
    assert main(argv) == 0
    vocab = len(tiny_models.VOCAB)
    assert f"evaluation logits <= {2 * 4 * 64 * vocab * 4 / 1024:.2f} KiB" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--task", "lm-eval"], "--task lm-eval needs --lm-eval-tasks"),
        (["--lm-eval-tasks", "tiny_a"], "--lm-eval-tasks applies to --task lm-eval only"),
        (
            ["--task", "lm-eval", "--lm-eval-tasks", "tiny_a", "--metric", "accuracy"],
            "--metric does not apply to --task lm-eval",
        ),
        (
            ["--task", "lm-eval", "--lm-eval-tasks", "tiny_a", "tiny_b", "--lm-eval-weights", "1"],
            "--lm-eval-weights takes one weight per task (2), got 1",
        ),
        (["--task", "lm-eval", "--lm-eval-tasks", "tiny_a", "--lm-eval-weights", "-1"], "--lm-eval-weights must be"),
        (
            ["--task", "lm-eval", "--lm-eval-tasks", "tiny_a", "tiny_b", "--lm-eval-metric", "acc", "acc", "acc"],
            "--lm-eval-metric takes one metric or one per task (2), got 3",
        ),
        (
            ["--task", "lm-eval", "--lm-eval-tasks", "tiny_a", "--lm-eval-metric", "bleu"],
            "--lm-eval-metric bleu: task tiny_a computes acc, acc_norm",
        ),
        (["--task", "lm-eval", "--lm-eval-tasks", "tiny_a", "--merge-method", "fisher"], "fisher estimates statistics"),
    ],
)
def test_option_errors_are_one_line_naming_the_option(llama_pop, lm_tasks, tmp_path, capsys, extra, message):
    dev = ["--dev", lm_tasks] if "--task" in extra else ["--dev", llama_pop.dev[0]]
    assert main(["--models", *llama_pop.models, *dev, "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_dev_must_be_task_folders(llama_pop, tmp_path, capsys):
    argv = [
        "--models",
        *llama_pop.models,
        "--task",
        "lm-eval",
        "--lm-eval-tasks",
        "tiny_a",
        "--dev",
        llama_pop.dev[0],
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 2
    assert "--dev " + llama_pop.dev[0] + ": not a folder (with --task lm-eval" in capsys.readouterr().err


def test_unknown_task_names_the_option_and_the_folders(llama_pop, lm_tasks, tmp_path, capsys):
    argv = [
        "--models",
        *llama_pop.models,
        "--task",
        "lm-eval",
        "--lm-eval-tasks",
        "tiny_a",
        "no_such_task_here",
        "--dev",
        lm_tasks,
        "--out",
        str(tmp_path / "out"),
        "--dry-run",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"--lm-eval-tasks no_such_task_here: no such task in {lm_tasks} or in lm-eval's registry" in err, err


def test_missing_extra_names_it(llama_pop, lm_tasks, tmp_path, capsys, monkeypatch):
    """Without lm-eval installed (simulated: its import fails), one line says which extra to install."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    argv = [
        "--models",
        *llama_pop.models,
        "--task",
        "lm-eval",
        "--lm-eval-tasks",
        "tiny_a",
        "--dev",
        lm_tasks,
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "error: --task lm-eval needs lm-evaluation-harness, which is not installed: "
        'pip install "evolver-kernels[lm-eval]"'
    ), err
    from evolver_kernels.evaluation import LmEvalEvaluator

    with pytest.raises(ValueError, match=r'pip install "evolver-kernels\[lm-eval\]"'):
        LmEvalEvaluator(None, None, tasks=["tiny_a"])


def test_yaml_and_flags_read_the_options_alike(tmp_path):
    from evolver_kernels.evolve.config import parse_config

    path = tmp_path / "run.yaml"
    path.write_text(
        "task: lm-eval\nlm_eval_tasks: [tiny_a, tiny_b]\nlm_eval_metric: acc_norm\nlm_eval_weights: [3, 1e-1]\n"
        "lm_eval_fewshot: 2\n"
    )
    from_yaml = parse_config(["--config", str(path)])
    flags = parse_config(
        [
            "--task",
            "lm-eval",
            "--lm-eval-tasks",
            "tiny_a",
            "tiny_b",
            "--lm-eval-metric",
            "acc_norm",
            "--lm-eval-weights",
            "3",
            "1e-1",
            "--lm-eval-fewshot",
            "2",
        ]
    )
    for cfg in (from_yaml, flags):
        assert (cfg.lm_eval_tasks, cfg.lm_eval_metric, cfg.lm_eval_weights, cfg.lm_eval_fewshot) == (
            ["tiny_a", "tiny_b"],
            ["acc_norm"],
            [3.0, 0.1],
            2,
        )


def test_recipe_search_with_an_lm_eval_fitness(llama_pop, lm_tasks, tmp_path):
    """--search recipe scores its candidates with lm-eval too; the output scores its final fitness under lm-eval."""
    args = ["--search", "recipe", "--merge-method", "task_arithmetic", "--base-model", llama_pop.base]
    args += ["--population-size", "3", "--generations", "1", "--lm-eval-tasks", "tiny_a", "tiny_b"]
    doc = _evolve(llama_pop.models, lm_tasks, tmp_path / "run", *args)
    assert doc["evaluations"] == 4 and doc["recipe"]["candidates_scored"] == 4
    ours = _lm_eval(str(tmp_path / "run"), lm_tasks, ["tiny_a", "tiny_b"])
    assert doc["final_per_file"] == {"tiny_a": ours["tiny_a"]["acc,none"], "tiny_b": ours["tiny_b"]["acc,none"]}
