"""Head-to-head on the SmolLM2 lm-eval scenario (python/smollm_lm_eval.py): mergekit-evolve against Evolver's
recipe search and its weight search, at the same number of fitness evaluations, on a CPU.

Scenario: the three fortunes experts of python/smollm_demo.py and their base (built and cached under --cache, as
smollm_lm_eval.py builds them), the local lm-eval quote-completion tasks of smollm_lm_eval.write_tasks. Fitness:
acc_norm on the dev tasks (one per domain, --limit questions each, 0-shot). Tools, each run as a subprocess:

  mergekit-evolve             mergekit-evolve through benchmarks/mergekit_evolve_cpu.py: CMA-ES over task_arithmetic
                              weights, one per model and layer group (layer_granularity = layers / --layer-groups),
                              --strategy serial (each candidate merged to disk, loaded and scored by lm-eval), the
                              dev tasks with weight 1, no chat template; its output is storage/final_model.
  evolver-recipe              `python -m evolver_kernels.evolve --search recipe` (CMA-ES over the same genome, in
                              memory), --merge-method task_arithmetic --layer-groups K.
  evolver-weights-merged      `--search weights --fitness merged`, the options smollm_lm_eval.py runs Evolver with.
  evolver-weights-individual  the same with `--fitness individual`.

Measured per tool and seed: wall time of the whole command (start-up, the search, writing the output), seconds
per candidate (wall / evaluations), peak memory (RSS summed over the process and all its descendants, Ray's
workers and daemons included, sampled every 0.2 s: shared pages count once per process, so this overstates
what the tree holds), the evaluations the run reports, and the output model's held-out acc_norm on the test
tasks (smollm_lm_eval.accuracies: the same lm-eval call for every output, --test-limit questions per domain).

Same budget: ours run --max-evaluations E. mergekit-evolve can only stop after whole cma generations of P
genotypes and then scores cma's final mean once more, so it runs g x P + 1 evaluations: the most that fit in E,
with cma's default P (int(4 + 3 ln N), N = K x 3 weights; smaller only when E <= P). With K = 3 (P = 10) and
E = 24 that is 21; E = 21 or 31 makes the budgets equal. The table's evaluations column is what each run
counted, and seconds per candidate divide by it. Seeds: ours --seed S; mergekit-evolve --random-seed S and
--cma-seed S + 1 (cma takes 0 for "seed from the clock"). OMP_NUM_THREADS is set to the CPU count for every
command (unless already set), because Ray gives a task that asks for one CPU OMP_NUM_THREADS=1, which would make
torch in mergekit's workers single-threaded. mergekit-evolve merges and evaluates in bfloat16 (its own choice),
ours in the models' float32.

    python benchmarks/recipe_vs_mergekit_evolve.py --cache .cache/smollm --seeds 0 1 2 --evaluations 24
    python benchmarks/recipe_vs_mergekit_evolve.py --smoke     # tiny Llamas and tiny tasks, a few minutes

Writes --out/results.json (every row) and --out/results.md (the table, also printed); each run in
--out/<tool>-seed<S>/ (its log, its output model, row.json). A run whose row.json exists is not run again: delete
its folder to rerun it. --smoke builds three tiny Llama fine-tunes, their base and tiny multiple-choice tasks
under --out/fixture (named like the scenario's tasks, so the same scoring code runs) and defaults to one seed,
4 evaluations and 2 layer groups.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))

from smollm_lm_eval import LM_EVAL_MAX_LENGTH, METRIC, TASK_YAML, accuracies, task_names  # noqa: E402

from evolver_kernels.testing.synthetic import PeakSampler  # noqa: E402

TOOLS = ["mergekit-evolve", "evolver-recipe", "evolver-weights-merged", "evolver-weights-individual"]
LAUNCHER = os.path.join(HERE, "mergekit_evolve_cpu.py")
GIB = 1 << 30


@dataclass
class Scenario:
    base: str
    experts: list[str]
    tasks_dir: str
    num_layers: int


def smollm_scenario(cache: str, lr: float = 1e-4) -> Scenario:
    """The experts, base and tasks of smollm_lm_eval.py (the same cache: built once, by either script)."""
    from smollm_demo import DOMAINS, base_model, fine_tune, write_data
    from smollm_lm_eval import write_tasks

    base = base_model(cache)
    data = write_data(cache, seed=0)
    experts = [
        fine_tune(base, data[d]["train"], os.path.join(cache, f"expert-{d}"), seed=k, lr=lr)
        for k, d in enumerate(DOMAINS)
    ]
    return Scenario(base, experts, write_tasks(cache, data), _num_layers(base))


def tiny_scenario(root: str) -> Scenario:
    """Three tiny Llama fine-tunes (2 layers) of a saved base and, per domain and split, a multiple-choice task of
    24 questions in the tiny vocabulary: the answer repeats the question's last word, two other words are the
    distractors (tests/evaluation/test_lm_eval.py's task)."""
    from smollm_demo import DOMAINS

    from evolver_kernels.testing import tiny_models

    experts = [os.path.join(root, f"llama-{k}") for k in range(3)]
    if not all(os.path.exists(os.path.join(e, "config.json")) for e in experts):
        experts = tiny_models.make_population("llama", root, 3, noise=0.05, save_base=True)
    tasks_dir = os.path.join(root, "lm_eval_tasks")
    os.makedirs(tasks_dir, exist_ok=True)
    for k, domain in enumerate(DOMAINS):
        for j, split in enumerate(("dev", "test")):
            rng = random.Random(10 * k + j)
            rows = []
            for _ in range(24):
                words = [rng.choice(tiny_models.WORDS) for _ in range(rng.randint(3, 7))]
                choices = rng.sample([w for w in tiny_models.WORDS if w != words[-1]], 2)
                answer = rng.randrange(3)
                choices.insert(answer, words[-1])
                rows.append({"question": " ".join(words), "choices": choices, "answer": answer})
            name = f"fortunes_{domain}_{split}"
            data = tiny_models.write_jsonl(os.path.join(tasks_dir, f"{name}.jsonl"), rows)
            with open(os.path.join(tasks_dir, f"{name}.yaml"), "w") as f:
                f.write(TASK_YAML.format(name=name, data=data))
    base = os.path.join(root, "llama-base")
    return Scenario(base, experts, tasks_dir, _num_layers(base))


def _num_layers(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)["num_hidden_layers"]


def mergekit_budget(evaluations: int, n_genes: int) -> tuple[int, int, int]:
    """(popsize, --max-fevals, evaluations it runs) for mergekit-evolve within `evaluations`: cma's default popsize
    int(4 + 3 ln N) (smaller only when one generation would not fit), the most whole generations g with
    g x popsize + 1 <= evaluations (cma scores the final mean once more), and --max-fevals g x popsize - 1, which
    stops cma after exactly g (mergekit_evolve_cpu.py's docstring)."""
    popsize = min(int(4 + 3 * math.log(n_genes)), evaluations - 1)
    generations = (evaluations - 1) // popsize
    return popsize, generations * popsize - 1, generations * popsize + 1


def command(tool: str, sc: Scenario, seed: int, args: argparse.Namespace, run_dir: str) -> tuple[list[str], str]:
    """(argv, the output model directory) of one run."""
    dev = task_names("dev")
    groups = args.layer_groups
    if tool == "mergekit-evolve":
        import yaml

        genome = {
            "genome": {
                "models": sc.experts,
                "base_model": sc.base,
                "merge_method": "task_arithmetic",
                "layer_granularity": sc.num_layers // groups,
            },
            "tasks": [{"name": t, "weight": 1.0, "metric": f"{METRIC},none"} for t in dev],
            "limit": args.limit,
            "num_fewshot": 0,
            # ours score the plain prompt; mergekit's default would wrap it in the chat template
            "apply_chat_template": False,
            "fewshot_as_multiturn": False,
        }
        config = os.path.join(run_dir, "genome.yml")
        with open(config, "w") as f:
            yaml.safe_dump(genome, f)
        popsize, max_fevals, _ = mergekit_budget(args.evaluations, groups * len(sc.experts))
        storage = os.path.join(run_dir, "storage")
        argv = [
            *(sys.executable, LAUNCHER, config, "--storage-path", storage),
            *("--max-fevals", str(max_fevals), "--force-population-size", str(popsize)),
            *("--no-vllm", "--no-merge-cuda", "--strategy", "serial", "--task-search-path", sc.tasks_dir),
            *("--batch-size", str(args.batch_size), "--random-seed", str(seed), "--cma-seed", str(seed + 1)),
        ]
        return argv, os.path.join(storage, "final_model")
    lm_eval = [
        *("--task", "lm-eval", "--dev", sc.tasks_dir, "--lm-eval-tasks", *dev, "--lm-eval-metric", METRIC),
        *("--max-dev-examples", str(args.limit), "--batch-size", str(args.batch_size)),
        *("--max-length", str(LM_EVAL_MAX_LENGTH), "--device", "cpu"),
    ]
    common = [sys.executable, "-m", "evolver_kernels.evolve", "--models", *sc.experts, *lm_eval, "--seed", str(seed)]
    out = os.path.join(run_dir, "out")
    if tool == "evolver-recipe":
        search = ["--search", "recipe", "--merge-method", "task_arithmetic", "--base-model", sc.base]
        search += ["--layer-groups", str(groups), "--max-evaluations", str(args.evaluations)]
        return [*common, *search, "--out", out], out
    fitness = tool.rsplit("-", 1)[1]
    search = ["--search", "weights", "--fitness", fitness, "--max-evaluations", str(args.evaluations)]
    return [*common, *search, "--population-on", "cpu", "--out", out], out


def tree_rss(pid: int) -> int:
    """RSS summed over a process and all its descendants; OSError once the process is gone (ends sampling)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error as e:
        raise OSError(str(e)) from e
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):  # a child that exited between the listing and the read
            total += p.memory_info().rss
    return total


def run_tool(tool: str, sc: Scenario, seed: int, args: argparse.Namespace) -> dict:
    run_dir = os.path.join(args.out, f"{tool}-seed{seed}")
    record = os.path.join(run_dir, "row.json")
    if os.path.exists(record):
        with open(record) as f:
            return json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    argv, model_dir = command(tool, sc, seed, args, run_dir)
    row = {"tool": tool, "seed": seed, "evaluations_asked": args.evaluations}
    log_path = os.path.join(run_dir, "log.txt")
    env = {**os.environ, "EVOLVER_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    print(f"[h2h] {tool} seed {seed}: {' '.join(argv)}", file=sys.stderr, flush=True)
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        peak = PeakSampler(lambda: tree_rss(proc.pid), 0.2)
        rc = proc.wait()
        wall = time.perf_counter() - start
        peak_bytes = peak.stop()
    row |= {"command": argv, "returncode": rc, "wall_s": wall, "peak_gib": peak_bytes / GIB, "log": log_path}
    if rc != 0:
        with open(log_path) as f:
            row["error"] = f.read()[-2000:]
        print(f"[h2h] {tool} seed {seed}: exit {rc}; see {log_path}", file=sys.stderr, flush=True)
        return row  # not recorded: the next invocation runs it again
    row["evaluations"] = evaluations(tool, log_path, model_dir)
    row["s_per_candidate"] = wall / row["evaluations"]
    row["model"] = model_dir
    acc = accuracies(model_dir, sc.tasks_dir, "test", args.test_limit, args.batch_size)
    row["heldout"] = dict(zip(task_names("test"), acc))
    row["heldout_mean"] = sum(acc) / len(acc)
    with open(record, "w") as f:
        json.dump(row, f, indent=2)
    return row


def evaluations(tool: str, log_path: str, model_dir: str) -> int:
    """What the run counted: mergekit-evolve prints "Received <n> genotypes" per batch (each generation, then the
    final mean); ours write evaluations into evolution.json."""
    if tool == "mergekit-evolve":
        with open(log_path) as f:
            return sum(int(line.split()[1]) for line in f if line.startswith("Received ") and "genotypes" in line)
    with open(os.path.join(model_dir, "evolution.json")) as f:
        return json.load(f)["evaluations"]


def table(rows: list[dict]) -> str:
    from smollm_demo import DOMAINS

    head = ["tool", "seed", f"held-out {METRIC} mean", *DOMAINS, "evaluations", "wall s", "s / candidate", "peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def line(tool, seed, mean, per, evals, wall, per_cand, peak) -> str:
        cells = [tool, seed, f"{mean:.3f}", *(f"{a:.3f}" for a in per), evals, f"{wall:.0f}", f"{per_cand:.1f}"]
        return "| " + " | ".join(str(c) for c in [*cells, f"{peak:.2f}"]) + " |"

    done = [r for r in rows if "heldout" in r]
    for r in done:
        per = list(r["heldout"].values())
        lines.append(
            line(
                r["tool"],
                r["seed"],
                r["heldout_mean"],
                per,
                r["evaluations"],
                r["wall_s"],
                r["s_per_candidate"],
                r["peak_gib"],
            )
        )
    for tool in TOOLS:
        mine = [r for r in done if r["tool"] == tool]
        if len(mine) > 1:
            mean = lambda key, rs=mine: statistics.mean(r[key] for r in rs)
            per = [statistics.mean(r["heldout"][t] for r in mine) for t in task_names("test")]
            evals = f"{mean('evaluations'):g}"
            lines.append(
                line(
                    f"**{tool}**",
                    "mean",
                    mean("heldout_mean"),
                    per,
                    evals,
                    mean("wall_s"),
                    mean("s_per_candidate"),
                    mean("peak_gib"),
                )
            )
    for r in rows:
        if "heldout" not in r:
            lines.append(f"| {r['tool']} | {r['seed']} | failed (exit {r['returncode']}): see {r['log']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--evaluations", type=int, help="fitness evaluations per run (default 24; --smoke 4)")
    parser.add_argument("--limit", type=int, help="dev questions per task in the fitness (default 24; --smoke 8)")
    parser.add_argument("--test-limit", type=int, help="held-out questions per task (default 64; --smoke 24)")
    parser.add_argument("--layer-groups", type=int, help="layer groups K, layers %% K == 0 (default 3; --smoke 2)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=TOOLS)
    parser.add_argument("--out", default="demo_out/recipe_vs_mergekit_evolve")
    parser.add_argument("--cache", default=".cache/smollm")
    parser.add_argument("--smoke", action="store_true", help="tiny Llamas and tiny tasks instead of SmolLM2")
    args = parser.parse_args(argv)
    smoke = {"seeds": [0], "evaluations": 4, "limit": 8, "test_limit": 24, "layer_groups": 2}
    full = {"seeds": [0, 1, 2], "evaluations": 24, "limit": 24, "test_limit": 64, "layer_groups": 3}
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("EVOLVER_PROGRESS", "0")
    sc = tiny_scenario(os.path.join(args.out, "fixture")) if args.smoke else smollm_scenario(args.cache)
    if sc.num_layers % args.layer_groups:
        sys.exit(f"--layer-groups {args.layer_groups} does not divide the models' {sc.num_layers} layers")
    if args.evaluations < 3:
        sys.exit("--evaluations must be at least 3 (mergekit-evolve's smallest run: 2 genotypes and the mean)")
    # a failed run is reported in the table and the next one goes on
    rows = [run_tool(tool, sc, seed, args) for seed in args.seeds for tool in args.tools]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "metric": METRIC, "rows": rows}, f, indent=2)
    text = (
        f"Held-out {METRIC} ({args.test_limit} questions per domain) after {args.evaluations} fitness evaluations "
        f"(dev: {args.limit} questions per domain), {args.layer_groups} layer groups\n\n{table(rows)}\n"
    )
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if all("heldout" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
