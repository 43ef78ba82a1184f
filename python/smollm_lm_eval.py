"""The SmolLM2 scenario with an lm-evaluation-harness fitness: the three fortunes experts of python/smollm_demo.py
(the same base, data and fine-tunes, cached under --cache) fused by averaging, task arithmetic and Evolver with
`--task lm-eval` on a local multiple-choice task built from the demo's own quotes; accuracy on held-out quotes;
and the time per candidate scored in memory against writing the candidate to disk and running lm-eval on the
directory (mergekit-evolve's default), both measured here on the same candidate.

Task: quote completion. Each quote is cut after 60% of its words; the choices are its own ending and the endings
of three other quotes of the same domain and split (a fixed seed draws them and the answer's position); metric
acc_norm (lm-eval's byte-length-normalised log-likelihood). One lm-eval task per domain and split, as YAML + JSONL
under <cache>/lm_eval_tasks: fortunes_<domain>_dev (the fitness: mean over the domains) and fortunes_<domain>_test
(the table: held-out quotes neither the experts nor Evolver saw).

    python python/smollm_lm_eval.py --cache .cache/smollm --out demo_out/smollm_lm_eval

The models are float32 (smollm_demo.DTYPE: a bf16 matmul is about 100x slower than an fp32 one on a CPU without
bf16 matrix instructions), so the population and the evaluation model are too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from smollm_demo import DOMAINS, DTYPE, TA_SCALES, base_model, fine_tune, log, write_data

from evolver_kernels.evaluation.evaluator import Evaluator
from evolver_kernels.evolve import main as evolve_main
from evolver_kernels.merge import main as merge_main

CUT = 0.6  # the share of a quote's words given as the question
CHOICES = 4
METRIC = "acc_norm"
LM_EVAL_MAX_LENGTH = 256  # tokens of question and choice: every quote fits (at most 600 characters)
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
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


def completion_rows(texts: list[str], seed: int) -> list[dict]:
    """One multiple-choice question per quote of at least 6 words: its first words, and its ending among
    CHOICES - 1 other quotes' endings."""
    rng = random.Random(seed)
    cut = [(w[: max(1, int(len(w) * CUT))], w[max(1, int(len(w) * CUT)) :]) for w in (t.split() for t in texts)]
    cut = [(q, e) for q, e in cut if len(q) + len(e) >= 6]
    rows = []
    for k, (question, ending) in enumerate(cut):
        others = rng.sample([e for j, (_, e) in enumerate(cut) if j != k], CHOICES - 1)
        answer = rng.randrange(CHOICES)
        choices = [" ".join(e) for e in others]
        choices.insert(answer, " ".join(ending))
        rows.append({"question": " ".join(question), "choices": choices, "answer": answer})
    return rows


def write_tasks(cache: str, data: dict[str, dict[str, str]]) -> str:
    """The lm-eval task folder: fortunes_<domain>_<split> for the dev and test splits."""
    folder = os.path.join(cache, "lm_eval_tasks")
    os.makedirs(folder, exist_ok=True)
    for k, domain in enumerate(DOMAINS):
        for split in ("dev", "test"):
            with open(data[domain][split]) as f:
                texts = [json.loads(line)["text"] for line in f]
            name = f"fortunes_{domain}_{split}"
            path = os.path.abspath(os.path.join(folder, f"{name}.jsonl"))
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in completion_rows(texts, seed=100 + k))
            with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
                f.write(TASK_YAML.format(name=name, data=path))
    return folder


def task_names(split: str) -> list[str]:
    return [f"fortunes_{d}_{split}" for d in DOMAINS]


def load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE).eval(), AutoTokenizer.from_pretrained(model_dir)


def accuracies(model_dir: str, tasks_dir: str, split: str, limit: int, batch_size: int) -> list[float]:
    """acc_norm of the model on each domain's task of `split`, through the package's lm-eval evaluator."""
    model, tok = load(model_dir)
    ev = Evaluator(
        "lm-eval",
        tok,
        [tasks_dir],
        config=model.config,
        batch_size=batch_size,
        max_length=LM_EVAL_MAX_LENGTH,
        max_examples=limit,
        task_options={"tasks": task_names(split), "task_metrics": [METRIC]},
    )
    fit = ev(model)
    return [fit.per_file[t] for t in task_names(split)]


def candidate_times(model_dir: str, tasks_dir: str, limit: int, batch_size: int, repeats: int) -> dict:
    """Seconds to score one candidate (the dev fitness) in memory (HFLM around the loaded model, tasks built once)
    against writing it to disk and running lm-eval's simple_evaluate on the directory (the model loaded from it;
    lm-eval's task index built once beforehand, which favours the disk path). The same candidate and fitness."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, tok = load(model_dir)
    ev = Evaluator(
        "lm-eval",
        tok,
        [tasks_dir],
        config=model.config,
        batch_size=batch_size,
        max_length=LM_EVAL_MAX_LENGTH,
        max_examples=limit,
        task_options={"tasks": task_names("dev"), "task_metrics": [METRIC]},
    )
    ev(model)  # the first call wraps the model once, as the first candidate of a run does
    memory, disk, scores = [], [], []
    manager = TaskManager(include_path=tasks_dir, include_defaults=False)
    for _ in range(repeats):
        start = time.perf_counter()
        in_memory = ev(model).score
        memory.append(time.perf_counter() - start)
        scratch = tempfile.mkdtemp(prefix="candidate-", dir=os.path.dirname(os.path.abspath(model_dir)))
        try:
            start = time.perf_counter()
            model.save_pretrained(scratch)
            tok.save_pretrained(scratch)
            results = lm_eval.simple_evaluate(
                model="hf",
                model_args={
                    "pretrained": scratch,
                    "dtype": str(DTYPE).removeprefix("torch."),
                    "max_length": LM_EVAL_MAX_LENGTH,
                },
                tasks=task_names("dev"),
                limit=limit,
                batch_size=batch_size,
                device="cpu",
                bootstrap_iters=0,
                task_manager=manager,
                log_samples=False,
            )
            disk.append(time.perf_counter() - start)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        on_disk = sum(results["results"][t][f"{METRIC},none"] for t in task_names("dev")) / len(DOMAINS)
        scores.append((in_memory, on_disk))
    return {"in_memory_s": memory, "disk_s": disk, "fitness_in_memory_vs_disk": scores}


def evolve(
    experts: list[str], tasks_dir: str, out: str, seed: int, generations: int, limit: int, batch_size: int
) -> dict:
    """The driver in this process (merged fitness, population in host memory); its evolution.json."""
    record = os.path.join(out, "evolution.json")
    if not os.path.exists(record):
        shutil.rmtree(out, ignore_errors=True)
        argv = [
            "--models",
            *experts,
            "--task",
            "lm-eval",
            "--dev",
            tasks_dir,
            "--lm-eval-tasks",
            *task_names("dev"),
            "--lm-eval-metric",
            METRIC,
            "--max-dev-examples",
            str(limit),
            "--batch-size",
            str(batch_size),
            "--max-length",
            str(LM_EVAL_MAX_LENGTH),
            "--fitness",
            "merged",
            "--population-on",
            "cpu",
            "--generations",
            str(generations),
            "--seed",
            str(seed),
            "--device",
            "cpu",
            "--out",
            out,
        ]
        if evolve_main(argv) != 0:
            sys.exit(f"evolve failed: {' '.join(argv)}")
    with open(record) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=".cache/smollm")
    parser.add_argument("--out", default="demo_out/smollm_lm_eval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generations", type=int, default=1)
    parser.add_argument("--dev-limit", type=int, default=24, help="dev questions per domain in the fitness")
    parser.add_argument("--test-limit", type=int, default=64, help="held-out questions per domain in the table")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="candidates timed each way")
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("EVOLVER_PROGRESS", "0")
    base = base_model(args.cache)
    data = write_data(args.cache, seed=0)
    experts = [
        fine_tune(base, data[d]["train"], os.path.join(args.cache, f"expert-{d}"), seed=k, lr=args.lr)
        for k, d in enumerate(DOMAINS)
    ]
    tasks_dir = write_tasks(args.cache, data)

    def table_row(model_dir: str) -> list[float]:
        log(f"[smollm-lm-eval] held-out accuracy of {model_dir}")
        return accuracies(model_dir, tasks_dir, "test", args.test_limit, args.batch_size)

    rows: dict[str, list[float]] = {"base (SmolLM2-135M-Instruct)": table_row(base)}
    for d, e in zip(DOMAINS, experts):
        rows[f"expert: {d}"] = table_row(e)
    average = os.path.join(args.cache, "average")
    if not os.path.exists(average):
        assert merge_main(["--method", "average", "--models", *experts, "--out", average]) == 0
    rows["simple average"] = table_row(average)
    best = None
    for scale in TA_SCALES:
        path = os.path.join(args.cache, f"task-arithmetic-{scale}")
        if not os.path.exists(path):
            assert (
                merge_main(
                    [
                        "--method",
                        "task_arithmetic",
                        "--base",
                        base,
                        "--models",
                        *experts,
                        "--scale",
                        str(scale),
                        "--out",
                        path,
                    ]
                )
                == 0
            )
        dev = sum(accuracies(path, tasks_dir, "dev", args.dev_limit, args.batch_size)) / len(DOMAINS)
        if best is None or dev > best[0]:
            best = (dev, scale, path)
    rows[f"task arithmetic (lambda {best[1]}, chosen on dev)"] = table_row(best[2])
    run_dir = os.path.join(args.out, f"evolver-seed{args.seed}")
    start = time.perf_counter()
    run = evolve(experts, tasks_dir, run_dir, args.seed, args.generations, args.dev_limit, args.batch_size)
    run_s = time.perf_counter() - start
    rows[f"Evolver (lm-eval fitness, seed {args.seed}, {args.generations} generation(s))"] = table_row(run_dir)
    log("[smollm-lm-eval] timing one candidate in memory and through the disk")
    times = candidate_times(run_dir, tasks_dir, args.dev_limit, args.batch_size, args.repeats)

    lines = ["| model | " + " | ".join(DOMAINS) + " | mean |", "| --- |" + " --- |" * (len(DOMAINS) + 1)]
    for name, acc in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{a:.3f}" for a in acc) + f" | {sum(acc) / len(acc):.3f} |")
    memory, disk = min(times["in_memory_s"]), min(times["disk_s"])
    timing = run["timing_s"]
    text = (
        f"Held-out quote completion, {METRIC} ({args.test_limit} questions per domain, {CHOICES} choices; higher is "
        "better)\n\n" + "\n".join(lines) + "\n\n"
        f"Evolver run: {run['evaluations']} evaluations in {run_s:.0f} s (weights {timing['weights']:.1f} s, "
        f"evaluation {timing['evaluation']:.1f} s); fitness = mean dev {METRIC} over {len(DOMAINS)} tasks of "
        f"{args.dev_limit} questions.\n"
        f"Time per candidate (the same fitness, best of {args.repeats}): in memory {memory:.1f} s; written to disk and "
        f"run through lm-eval {disk:.1f} s ({disk / memory:.1f}x); fitness in memory vs from disk: "
        + ", ".join(f"{a:.4f} / {b:.4f}" for a, b in times["fitness_in_memory_vs_disk"])
        + "\n"
    )
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(
            {
                "domains": DOMAINS,
                "metric": METRIC,
                "accuracy": rows,
                "run_seconds": run_s,
                "timing_s": timing,
                "candidate_times": times,
                "args": vars(args),
            },
            f,
            indent=2,
        )
    print(text)


if __name__ == "__main__":
    main()
