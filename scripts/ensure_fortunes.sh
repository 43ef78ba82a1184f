#!/usr/bin/env bash
# Installs Debian's fortunes package (the quotes behind the fortunes and SmolLM2 scenarios) when it is
# missing; needs root or sudo. Sourced by scripts/demo_fortunes.sh and scripts/ensure_smollm.sh.
if [ ! -f /usr/share/games/fortunes/computers ]; then
  echo "[setup] installing Debian's fortunes package"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq fortunes
fi
