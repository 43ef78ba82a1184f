#!/usr/bin/env bash
# The second scenario: fortunes topic experts on non-IID label partitions (python/fortunes_demo.py).
# Installs Debian's fortunes package when it is missing (needs root or sudo), then sets up and runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -f /usr/share/games/fortunes/computers ]; then
  echo "[setup] installing Debian's fortunes package"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq fortunes
fi
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python python/fortunes_demo.py --cache .cache --out demo_out/fortunes "$@"
