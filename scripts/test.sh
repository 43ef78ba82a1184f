#!/usr/bin/env bash
# The test command: sets everything up from nothing (scripts/setup_env.sh), checks the code with ruff (lint rules
# and formatting in pyproject.toml: `ruff format .` fixes the latter), then runs the test suite.
# Triton runs under its interpreter on a machine without a GPU. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
ruff check .
ruff format --check .
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
python -m pytest -q tests "$@"
