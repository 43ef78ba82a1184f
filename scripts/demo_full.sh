#!/usr/bin/env bash
# The main job's whole table (docs/demos.md): seeds 0, 1 and 2 and every row, --select-fraction and --adapt jde
# included; about 50 minutes on 2 cores (the runs of scripts/demo.sh are reused from .cache/).
set -euo pipefail
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/demo.sh" --full "$@"
