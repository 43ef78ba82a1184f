#!/usr/bin/env bash
# The whole test suite on the GPU machines' package versions (scripts/requirements-gpu-image.txt: torch 2.11,
# triton 3.6, transformers 5.17), on the CPU: a fresh clone of HEAD in a temporary folder, its own virtual
# environment (kept in $EVOLVER_COMPAT_VENV, default /tmp/evolver-compat-venv, about 5 GB; reused next time),
# the extensions built against that torch, then scripts/test.sh. Not part of CI (it downloads the other torch).
#   bash scripts/compat_check.sh [pytest arguments]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
git -C "$ROOT" clone --quiet "$ROOT" "$WORK/repo"
cd "$WORK/repo"
EVOLVER_VENV="${EVOLVER_COMPAT_VENV:-/tmp/evolver-compat-venv}" \
EVOLVER_REQUIREMENTS="$WORK/repo/scripts/requirements-gpu-image.txt" \
  bash scripts/test.sh "$@"
