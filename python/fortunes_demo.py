"""The second scenario: Evolver on fortunes topic experts trained on non-IID label partitions, against the
usual baselines, on an IID test set of 400 quotes over 8 categories (python/fortunes_population.py).

    python python/fortunes_demo.py --generations 5
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fortunes_population
import scenario

if __name__ == "__main__":
    scenario.main(__doc__, fortunes_population.build, "fortunes", max_length=64, default_out="demo_out/fortunes")
