#!/usr/bin/env bash
# The SmolLM2 scenario with an lm-evaluation-harness fitness (python/smollm_lm_eval.py): the experts of
# scripts/demo_smollm.sh (built here when missing, cached under .cache/smollm) evolved with --task lm-eval on
# a local multiple-choice task made from the demo's quotes; held-out accuracy table and the time per
# candidate in memory against writing it to disk and running lm-eval on it. setup_env.sh installs lm-eval.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/ensure_smollm.sh"
cd "$ROOT"
python python/smollm_lm_eval.py --cache .cache/smollm --out demo_out/smollm_lm_eval "$@"
