#!/usr/bin/env bash
# The main job: sets everything up (scripts/setup_env.sh), builds or reuses the embedded population (a real
# MiniLM fine-tuned into 4 drug-review domain experts, cached under .cache/), scores the merging baselines,
# runs `python -m evolver_kernels.evolve` on it (merged fitness over the average, Fisher and RegMean merges;
# individual fitness) for seed 0, and prints the results table (also written to demo_out/results.md): the
# headline rows of docs/demos.md, in about 15 minutes on 2 cores from a fresh clone. The whole table (3 seeds,
# the --select-fraction and --adapt jde rows; about 50 minutes) is `bash scripts/demo_full.sh`.
# Extra arguments go to python/drug_demo.py (e.g. --generations 8).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export EVOLVER_PROGRESS="${EVOLVER_PROGRESS:-1}"
python python/drug_demo.py --cache .cache --out demo_out "$@"
