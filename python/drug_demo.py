"""The README's main job: Evolver on the embedded drug-review population, against the usual baselines.

Builds (or reuses) the population of python/drug_population.py (4 MiniLM domain experts on drug reviews),
then runs the scenario of python/scenario.py: Evolver in both fitness modes for 3 seeds, experts, simple
average, task arithmetic and TIES, scored on each in-domain test split and the held-out domain.

    python python/drug_demo.py --generations 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import drug_population  # noqa: E402
import scenario  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=".cache", help="population and runs are cached here")
    parser.add_argument("--out", default="demo_out", help="results.md and results.json go here")
    parser.add_argument("--generations", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--population-seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    manifest = drug_population.build(os.path.join(args.cache, "drug-population"), seed=args.population_seed,
                                     log=scenario.log)
    print(scenario.run(manifest, os.path.join(args.cache, "drug-runs"), args.out, args.generations, args.seeds,
                       max_length=128, population_seed=args.population_seed, started=started))


if __name__ == "__main__":
    main()
