#!/usr/bin/env bash
# The head-to-head of benchmarks/recipe_vs_mergekit_evolve.py from a fresh clone: mergekit-evolve (through
# benchmarks/mergekit_evolve_cpu.py, which installs ray and cma when missing), `evolve --search recipe` and
# Evolver in both fitness modes, at the same number of fitness evaluations, on the SmolLM2 lm-eval scenario
# (the experts of scripts/demo_smollm.sh, built here when missing and cached under .cache/smollm). Arguments go
# to the benchmark (e.g. --seeds 0 --evaluations 21); the table lands in demo_out/recipe_vs_mergekit_evolve.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/ensure_smollm.sh"
cd "$ROOT"
python benchmarks/recipe_vs_mergekit_evolve.py --cache .cache/smollm "$@"
