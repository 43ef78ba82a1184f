"""A demo scenario end to end, given a population manifest (see drug_population.py, fortunes_population.py):

1. Scores every expert and the merging baselines: simple average, task arithmetic and TIES (settings chosen
   on dev), Fisher merging and RegMean (statistics from the dev files, RegMean's alpha chosen on dev).
2. Runs `python -m evolver_kernels.evolve` (in process, same code path) with the paper's defaults
   (F = 0.5, CR = 0.5) for several seeds: merged fitness on top of the average, Fisher and RegMean merges (the
   reference code's configurations), and individual fitness; selection on the dev files only.
3. Scores everything on each test file and returns a Markdown table (also written to <out>/results.md, .json).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time

import torch

from evolver_kernels.evaluation.evaluator import Evaluator
from evolver_kernels.evolve.config import EvolveConfig
from evolver_kernels.evolve.offspring import WeightPipeline
from evolver_kernels.evolve.recipe import RecipeRun
from evolver_kernels.evolve.run import Run
from evolver_kernels.io import model_io
from evolver_kernels.methods.merger import Merger, average, task_arithmetic, ties
from evolver_kernels.methods.statistics import RegMean, collect_grams, estimate_fisher
from evolver_kernels.storage.arena import Arena, Layout, safetensors_files
from evolver_kernels.storage.population import make_population

TA_SCALES = [0.3, 0.5, 0.7, 1.0]
TIES_GRID = [(0.2, 0.5), (0.2, 1.0), (0.5, 0.5), (0.5, 1.0)]  # (density, scale), chosen on dev
REGMEAN_ALPHAS = [0.1, 0.5, 0.9]  # chosen on dev
STATS_EXAMPLES = 256  # dev examples behind the Fisher / RegMean statistics


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# the Evolver runs of a scenario: (fitness, merge method, the row's label; {alpha} is RegMean's, chosen on dev)
VARIANTS = [
    ("merged", "average", "Evolver + average (merged fitness)"),
    ("merged", "fisher", "Evolver + Fisher (merged fitness)"),
    ("merged", "regmean", "Evolver + RegMean, alpha {alpha} (merged fitness)"),
    ("individual", "average", "Evolver, individual fitness"),
]


# the rows of held-out selection (a quarter of each dev file held out, the output chosen on it among the run's
# result and the experts) and of self-adaptive DE (jDE), as (fitness, merge method, label, options)
SELECTION_FRACTION = 0.25
OPTION_VARIANTS = [
    (
        "merged",
        "average",
        f"Evolver + average (merged fitness), --select-fraction {SELECTION_FRACTION}",
        {"select_fraction": SELECTION_FRACTION},
    ),
    (
        "individual",
        "average",
        f"Evolver, individual fitness, --select-fraction {SELECTION_FRACTION}",
        {"select_fraction": SELECTION_FRACTION},
    ),
    ("merged", "average", "Evolver + average (merged fitness), --adapt jde", {"adapt": "jde"}),
    ("individual", "average", "Evolver, individual fitness, --adapt jde", {"adapt": "jde"}),
]


# the recipe search (CMA-ES over the average's weights per layer group and expert: mergekit-evolve's genome) at the
# budget of the merged-fitness Evolver row: 1 + generations x experts fitness evaluations
RECIPE_GROUPS = 2
RECIPE_VARIANT = (
    "merged",
    "average",
    f"recipe search (CMA-ES over the average's weights, {RECIPE_GROUPS} layer groups), {{budget}} evaluations",
    {"search": "recipe", "layer_groups": RECIPE_GROUPS},
)


def run_name(fitness: str, method: str, seed: int, options: dict | None = None) -> str:
    """The directory of an Evolver run under the scenario's runs directory."""
    suffix = "".join(f"-{'select' if k == 'select_fraction' else ''}{v}" for k, v in (options or {}).items())
    middle = "" if method == "average" else f"-{method}"
    return f"evolver-{fitness}{middle}{suffix}-seed{seed}"


def evolve(
    manifest: dict,
    out: str,
    fitness: str,
    seed: int,
    generations: int,
    max_length: int,
    merge_method: str = "average",
    merge_alpha: float = 0.5,
    early_reject: str = "on",
    options: dict | None = None,
) -> str:
    """Runs (or reuses a finished run of) the driver, with EvolveConfig `options` besides the demo's settings;
    returns the output model directory."""
    merge = {"fisher": {"examples": STATS_EXAMPLES}, "regmean": {"examples": STATS_EXAMPLES, "alpha": merge_alpha}}.get(
        merge_method, {}
    )
    cfg = EvolveConfig(
        models=manifest["experts"],
        dev=manifest["dev"],
        out=out,
        generations=generations,
        fitness=fitness,
        seed=seed,
        F=0.5,
        CR=0.5,
        max_length=max_length,
        metric="macro-f1",
        merge_method=merge_method,
        merge=merge,
        early_reject=early_reject,
        **(options or {}),
    )
    done = os.path.join(out, "evolution.json")
    if os.path.exists(done):
        with open(done) as f:
            recorded = json.load(f)["config"]
        wanted = cfg.result_options()
        if recorded == wanted:
            log(f"[demo] reusing {out}")
            return out
        shutil.rmtree(out)  # a finished run with other settings: start over
    cfg.resume = os.path.exists(os.path.join(out, "checkpoint", "state.json"))  # an interrupted run: continue it
    start = time.perf_counter()
    (RecipeRun if cfg.search == "recipe" else Run)(cfg, log=log).run()
    log(f"[demo] evolver {fitness} ({merge_method}) seed {seed}: {time.perf_counter() - start:.0f} s")
    return out


def merged_baselines(manifest: dict, out: str, dev_eval: Evaluator) -> tuple[dict[str, str], float]:
    """The merging baselines written as model directories (settings chosen on the dev splits), and the
    RegMean alpha chosen."""
    experts, base_dir = manifest["experts"], manifest["base"]
    config = model_io.load_config(experts[0])
    model = model_io.empty_model(config, "sequence-classification")
    layout = Layout.of_model(model)
    files = [safetensors_files(m) for m in experts]
    pop = make_population("cpu", layout, files, experts, torch.device("cpu"))
    arena = Arena.empty(layout)
    model_io.attach_arena(model, arena, files[0])
    dirs = {}
    average(pop, arena)
    dirs["simple average"] = os.path.join(out, "average")
    model_io.save_model(arena, experts[0], files[0], dirs["simple average"])
    base = model_io.load_model_arena(layout, safetensors_files(base_dir), base_dir)
    best = None
    for scale in TA_SCALES:
        task_arithmetic(pop, base, arena, scale)
        score = dev_eval(model).score
        log(f"[demo] task arithmetic scale {scale}: dev macro-F1 {score:.4f}")
        if best is None or score > best[0]:
            best = (score, scale)
    task_arithmetic(pop, base, arena, best[1])
    name = f"task arithmetic (scale {best[1]})"
    dirs[name] = os.path.join(out, "task_arithmetic")
    model_io.save_model(arena, experts[0], files[0], dirs[name])
    best = None
    for density, scale in TIES_GRID:
        ties(pop, base, arena, density=density, scale=scale)
        score = dev_eval(model).score
        log(f"[demo] TIES density {density} scale {scale}: dev macro-F1 {score:.4f}")
        if best is None or score > best[0]:
            best = (score, density, scale)
    ties(pop, base, arena, density=best[1], scale=best[2])
    name = f"TIES (density {best[1]}, scale {best[2]})"
    dirs[name] = os.path.join(out, "ties")
    model_io.save_model(arena, experts[0], files[0], dirs[name])

    pipeline = WeightPipeline(pop, torch.device("cpu"))

    def load(k: int) -> None:
        pipeline.copy_into(k, arena)

    start = time.perf_counter()
    fisher = estimate_fisher(model, layout, load, pop.size, dev_eval, STATS_EXAMPLES)
    average(pop, arena, fisher=fisher)
    log(f"[demo] Fisher merging: dev macro-F1 {dev_eval(model).score:.4f} ({time.perf_counter() - start:.0f} s)")
    dirs["Fisher merging"] = os.path.join(out, "fisher")
    model_io.save_model(arena, experts[0], files[0], dirs["Fisher merging"])
    grams = collect_grams(model, layout, load, pop.size, dev_eval, STATS_EXAMPLES)
    best = None
    for alpha in REGMEAN_ALPHAS:
        Merger("regmean", stats=RegMean(layout, grams, alpha), alpha=alpha)(pop, arena)
        score = dev_eval(model).score
        log(f"[demo] RegMean alpha {alpha}: dev macro-F1 {score:.4f}")
        if best is None or score > best[0]:
            best = (score, alpha)
    Merger("regmean", stats=RegMean(layout, grams, best[1]), alpha=best[1])(pop, arena)
    name = f"RegMean (alpha {best[1]})"
    dirs[name] = os.path.join(out, "regmean")
    model_io.save_model(arena, experts[0], files[0], dirs[name])
    return dirs, best[1]


def score_model(path: str, test_eval: Evaluator) -> dict[str, dict[str, float]]:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    return test_eval.classification_report(model)


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(rows: dict[str, list[dict]], columns: list[str], held_out: str | None) -> str:
    head = ["model"] + [f"{d} F1 / acc" for d in columns]
    keys = list(columns)
    if len(columns) > 1:
        head.append("in-domain mean F1 / acc")
        keys.append("__mean__")
    if held_out:
        head.append(f"held-out {held_out} F1 / acc")
        keys.append(held_out)
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, reports in rows.items():
        cells = [name]
        for d in keys:
            if d == "__mean__":
                f1 = [statistics.mean(r[x]["macro-f1"] for x in columns) for r in reports]
                acc = [statistics.mean(r[x]["accuracy"] for x in columns) for r in reports]
            else:
                f1 = [r[d]["macro-f1"] for r in reports]
                acc = [r[d]["accuracy"] for r in reports]
            cells.append(f"{fmt(f1)} / {fmt(acc)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(
    manifest: dict,
    runs: str,
    out: str,
    generations: int,
    seeds: list[int],
    max_length: int,
    population_seed: int,
    started: float,
    full: bool = True,
) -> str:
    """Scores experts, baselines and Evolver on the manifest's test files; returns the Markdown table. Without
    `full`, the Evolver rows are the headline ones (VARIANTS), without the OPTION_VARIANTS rows."""
    from transformers import AutoTokenizer

    columns, held_out = manifest["expert_domains"], manifest.get("held_out_domain")
    tok = AutoTokenizer.from_pretrained(manifest["experts"][0])
    config = model_io.load_config(manifest["experts"][0])
    names = list(manifest["test"])
    test_eval = Evaluator(
        "sequence-classification", tok, [manifest["test"][d] for d in names], config=config, max_length=max_length
    )
    dev_eval = Evaluator(
        "sequence-classification", tok, manifest["dev"], config=config, metric="macro-f1", max_length=max_length
    )

    def by_name(report):
        return dict(zip(names, report.values()))

    rows: dict[str, list[dict]] = {}
    for name, path in zip(manifest.get("expert_names", columns), manifest["experts"]):
        rows[f"expert: {name}"] = [by_name(score_model(path, test_eval))]
    baselines, alpha = merged_baselines(manifest, runs, dev_eval)
    for name, path in baselines.items():
        rows[name] = [by_name(score_model(path, test_eval))]
    chosen: dict[str, list[str]] = {}  # per --select-fraction row, what each seed's run output
    expert_names = dict(zip(manifest["experts"], manifest.get("expert_names", columns)))
    budget = 1 + generations * len(manifest["experts"])  # the merged-fitness Evolver run's evaluations
    for fitness, method, label, options in [(*v, {}) for v in VARIANTS] + [RECIPE_VARIANT] + OPTION_VARIANTS * full:
        reports = []
        recipe = options.get("search") == "recipe"
        row = label.format(alpha=alpha, budget=budget) + ("" if recipe else f", {generations} gen.")
        if recipe:
            options = {**options, "max_evaluations": budget}
        for seed in seeds:
            run_dir = evolve(
                manifest,
                os.path.join(runs, run_name(fitness, method, seed, options)),
                fitness,
                seed,
                generations,
                max_length,
                merge_method=method,
                merge_alpha=alpha,
                options=options,
            )
            reports.append(by_name(score_model(run_dir, test_eval)))
            if "select_fraction" in options:
                with open(os.path.join(run_dir, "evolution.json")) as f:
                    winner = json.load(f)["selection"]["chosen"].removeprefix("input model ")
                chosen.setdefault(row, []).append(
                    f"expert {expert_names[winner]}" if winner in expert_names else winner
                )
        rows[row] = reports
    md = table(rows, [c for c in columns if c in names], held_out)
    elapsed = time.perf_counter() - started
    outputs = "; ".join(
        f"{'individual' if 'individual' in row else 'merged'} fitness: "
        + ", ".join(f"seed {s} {w}" for s, w in zip(seeds, ws))
        for row, ws in chosen.items()
    )
    evolver = f"mean ± standard deviation over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    selection = (
        f" (--select-fraction rows: the search used {1 - SELECTION_FRACTION:.0%} of each dev file and the output "
        f"was chosen on the rest; chosen: {outputs})"
        if chosen
        else ""
    )
    headline = "" if full else " Headline rows only: --full adds the --select-fraction and --adapt jde rows."
    note = (
        f"\nMacro-F1 / accuracy (%) on the test files. Evolver rows: {evolver}; the other rows are deterministic "
        f"given the population (population seed {population_seed}). Selection used the dev files only{selection}."
        f"{headline} {elapsed:.0f} s on {os.cpu_count()} cores.\n"
    )
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md + "\n" + note)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(
            {"rows": rows, "seeds": seeds, "generations": generations, "seconds": elapsed, "chosen": chosen},
            f,
            indent=2,
        )
    return md + "\n" + note


def main(description: str, build, name: str, max_length: int, default_out: str, full_by_default: bool = True) -> None:
    """The command line of a demo: builds (or reuses) the population with `build`, runs the scenario, prints.
    --full: seeds 0, 1 and 2 and every row (the tables of docs/demos.md); without it (where full_by_default is
    False) seed 0 and the headline rows only."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=".cache", help="population and runs are cached here")
    parser.add_argument("--out", default=default_out, help="results.md and results.json go here")
    parser.add_argument("--generations", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", help="Evolver seeds (default: 0 1 2 with --full, else 0)")
    parser.add_argument(
        "--full",
        action=argparse.BooleanOptionalAction,
        default=full_by_default,
        help="every row of docs/demos.md's table over seeds 0, 1 and 2 (default: "
        f"{'on' if full_by_default else 'off: seed 0, the headline rows'})",
    )
    parser.add_argument("--population-seed", type=int, default=0)
    args = parser.parse_args()
    seeds = args.seeds or ([0, 1, 2] if args.full else [0])
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    manifest = build(os.path.join(args.cache, f"{name}-population"), seed=args.population_seed, log=log)
    print(
        run(
            manifest,
            os.path.join(args.cache, f"{name}-runs"),
            args.out,
            args.generations,
            seeds,
            max_length=max_length,
            population_seed=args.population_seed,
            started=started,
            full=args.full,
        )
    )
