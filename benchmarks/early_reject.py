"""Exact early rejection on the demos: every Evolver run of the drug-review and fortunes scenarios (both fitness
modes, the demos' settings: python/scenario.py), once with --early-reject on and once off, one after the other
in this process. Reports the dev examples scored against those full evaluations score, evaluation and run wall
time, and checks that both give the same model bytes and the same history (scores, acceptances).

    python benchmarks/early_reject.py --cache .cache             # after scripts/demo.sh and demo_fortunes.sh
    python benchmarks/early_reject.py --demos drug --seeds 0

The populations are built (or reused) under --cache as the demos do; RegMean's alpha is the one the demo chose
on dev (read from its cached run; else --regmean-alpha). Runs go under --runs (default <cache>/early-reject),
removed first. Writes a Markdown table and the numbers to --out (benchmarks/results/early_reject.{md,json}).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import drug_population  # noqa: E402
import fortunes_population  # noqa: E402
import scenario  # noqa: E402

DEMOS = {"drug": (drug_population.build, 128), "fortunes": (fortunes_population.build, 64)}  # max_length as the demos


def regmean_alpha(runs: str, default: float) -> float:
    """The alpha the demo chose on dev, from its cached RegMean run."""
    for seed in range(10):
        path = os.path.join(runs, scenario.run_name("merged", "regmean", seed), "evolution.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)["config"]["merge_alpha"]
    scenario.log(f"[bench] no cached RegMean run under {runs}: alpha {default}")
    return default


def same_result(a: str, b: str) -> bool:
    """The same model bytes and the same history but for the examples scored."""
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    if wa.keys() != wb.keys() or not all(torch.equal(wa[k].view(torch.uint8), wb[k].view(torch.uint8)) for k in wa):
        return False
    docs = []
    for d in (a, b):
        with open(os.path.join(d, "evolution.json")) as f:
            doc = json.load(f)
        docs.append(
            (
                [{k: v for k, v in g.items() if k != "examples_scored"} for g in doc["generations"]],
                doc["final_fitness"],
                doc["final_per_file"],
            )
        )
    return docs[0] == docs[1]


def one_run(manifest, out, fitness, method, seed, args, max_length, alpha, early) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    scenario.evolve(
        manifest,
        out,
        fitness,
        seed,
        args.generations,
        max_length,
        merge_method=method,
        merge_alpha=alpha,
        early_reject=early,
    )
    wall = time.perf_counter() - start
    with open(os.path.join(out, "evolution.json")) as f:
        doc = json.load(f)
    gens = doc["generations"][1:]  # generation 0 scores the initial population in full either way
    return {
        "wall_s": wall,
        "evaluation_s": doc["timing_s"]["evaluation"],
        "scored": sum(g["examples_scored"] for g in gens),
        "full": sum(g["examples_full"] for g in gens),
        "scored_all": sum(g["examples_scored"] for g in doc["generations"]),
        "full_all": sum(g["examples_full"] for g in doc["generations"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=".cache")
    parser.add_argument("--runs", default=None)
    parser.add_argument("--demos", nargs="+", default=list(DEMOS), choices=list(DEMOS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--generations", type=int, default=5)
    parser.add_argument("--regmean-alpha", type=float, default=0.5)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "early_reject"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    os.environ.setdefault("EVOLVER_PROGRESS", "0")
    runs = args.runs or os.path.join(args.cache, "early-reject")
    rows = []
    for demo in args.demos:
        build, max_length = DEMOS[demo]
        manifest = build(os.path.join(args.cache, f"{demo}-population"), seed=0, log=scenario.log)
        alpha = regmean_alpha(os.path.join(args.cache, f"{demo}-runs"), args.regmean_alpha)
        for fitness, method, label in scenario.VARIANTS:
            for seed in args.seeds:
                name = scenario.run_name(fitness, method, seed)
                dirs = {early: os.path.join(runs, demo, early, name) for early in ("on", "off")}
                result = {
                    early: one_run(manifest, dirs[early], fitness, method, seed, args, max_length, alpha, early)
                    for early in ("on", "off")
                }
                row = {
                    "demo": demo,
                    "run": name,
                    "label": label.format(alpha=alpha),
                    **result,
                    "same": same_result(dirs["on"], dirs["off"]),
                }
                scenario.log(
                    f"[bench] {demo} {name}: scored {result['on']['scored']} of {result['on']['full']} "
                    f"examples; evaluation {result['on']['evaluation_s']:.1f} s vs "
                    f"{result['off']['evaluation_s']:.1f} s; same result: {row['same']}"
                )
                rows.append(row)
                write(rows, args, final=False)  # a partial table survives an interrupted benchmark
    write(rows, args)


def write(rows: list[dict], args, final: bool = True) -> None:
    def pct(a, b):
        return f"{100 * a / b:.1f}%" if b else "-"

    lines = [
        "| demo | run | examples scored, generations 1+ (on / full) | all evaluations incl. generation 0 | "
        "evaluation s (on / off) | run s (on / off) | same bytes and history |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        on, off = r["on"], r["off"]
        lines.append(
            f"| {r['demo']} | {r['run']} | {on['scored']} / {on['full']} ({pct(on['scored'], on['full'])}) | "
            f"{pct(on['scored_all'], on['full_all'])} | {on['evaluation_s']:.1f} / {off['evaluation_s']:.1f} | "
            f"{on['wall_s']:.1f} / {off['wall_s']:.1f} | {'yes' if r['same'] else 'NO'} |"
        )
    for demo in sorted({r["demo"] for r in rows}) + ["all"]:
        sel = [r for r in rows if demo in ("all", r["demo"])]
        s = {
            k: sum(r["on"][k] for r in sel)
            for k in ("scored", "full", "scored_all", "full_all", "evaluation_s", "wall_s")
        }
        off = {k: sum(r["off"][k] for r in sel) for k in ("evaluation_s", "wall_s")}
        lines.append(
            f"| **{demo}** | {len(sel)} runs | {s['scored']} / {s['full']} ({pct(s['scored'], s['full'])}) | "
            f"{pct(s['scored_all'], s['full_all'])} | {s['evaluation_s']:.0f} / {off['evaluation_s']:.0f} "
            f"(ratio {s['evaluation_s'] / off['evaluation_s']:.2f}) | {s['wall_s']:.0f} / {off['wall_s']:.0f} "
            f"(ratio {s['wall_s'] / off['wall_s']:.2f}) | {sum(r['same'] for r in sel)} of {len(sel)} |"
        )
    note = (
        f"\nSeeds {args.seeds}, {args.generations} generations, {os.cpu_count()} cores; evaluation s includes "
        "the Fisher / RegMean statistics (the same work in both). Each run with early rejection on, then off.\n"
    )
    if not final:
        note += "(partial: the benchmark was still running)\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n" + note)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    if final:
        print("\n".join(lines) + "\n" + note)


if __name__ == "__main__":
    main()
