"""The README's main job: Evolver on the embedded drug-review population, against the usual baselines.

Builds (or reuses) the population of python/drug_population.py (4 MiniLM domain experts on drug reviews),
then runs the scenario of python/scenario.py: Evolver in both fitness modes (seed 0; with --full seeds 0, 1
and 2 and the --select-fraction and --adapt jde rows), experts, simple average, task arithmetic and TIES, scored
on each in-domain test split and the held-out domain.

    python python/drug_demo.py --generations 5 [--full]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import drug_population
import scenario

if __name__ == "__main__":
    scenario.main(__doc__, drug_population.build, "drug", max_length=128, default_out="demo_out", full_by_default=False)
