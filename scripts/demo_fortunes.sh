#!/usr/bin/env bash
# The second scenario: fortunes topic experts on non-IID label partitions (python/fortunes_demo.py).
# Installs Debian's fortunes package when it is missing (needs root or sudo), then sets up and runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/ensure_fortunes.sh"
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python python/fortunes_demo.py --cache .cache --out demo_out/fortunes "$@"
