"""The second scenario: Evolver on fortunes topic experts trained on non-IID label partitions, against the
usual baselines, on an IID test set of 400 quotes over 8 categories (python/fortunes_population.py).

    python python/fortunes_demo.py --generations 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fortunes_population  # noqa: E402
import scenario  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=".cache")
    parser.add_argument("--out", default="demo_out/fortunes")
    parser.add_argument("--generations", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--population-seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    manifest = fortunes_population.build(os.path.join(args.cache, "fortunes-population"), seed=args.population_seed,
                                         log=scenario.log)
    print(scenario.run(manifest, os.path.join(args.cache, "fortunes-runs"), args.out, args.generations, args.seeds,
                       max_length=64, population_seed=args.population_seed, started=started))


if __name__ == "__main__":
    main()
