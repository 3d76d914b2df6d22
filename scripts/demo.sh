#!/usr/bin/env bash
# The main job on an embedded default: a real H&E slide in, an OME-Zarr and a heatmap out.
# No Redis, no server. Outputs land in ./demo-output (or the folder given as $1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/slidepipe demo --out "${1:-demo-output}"
