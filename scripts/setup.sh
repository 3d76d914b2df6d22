#!/usr/bin/env bash
# Create .venv and install slidepipe with its pinned dependencies (idempotent).
# torch is pinned to 2.13.0 through constraints.txt: on our machines that resolves to the
# CPU wheel that lies on disk, and nothing ever pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "slidepipe setup: $PYTHON not found; install Python 3.11+ (apt-get install python3 python3-venv)" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "slidepipe setup: Python 3.11+ is required, found $("$PYTHON" --version 2>&1)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv || {
    echo "slidepipe setup: could not create a virtual environment (apt-get install python3-venv)" >&2
    exit 1
  }
fi
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=".venv/.slidepipe-installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  python -m pip install --quiet --upgrade pip
  # torch first and alone, so that every later resolution sees the CPU build in place
  python -m pip install --quiet -c constraints.txt torch==2.13.0
  python -m pip install --quiet -c constraints.txt -e '.[dev]'
  rm -f .venv/.slidepipe-installed-*
  touch "$stamp"
fi

# -- the browser viewer and the export checks (docs/outputs.md) ---------------------------
# OpenSeadragon from npm (package.json + package-lock.json; node_modules is never committed).
if [ ! -f node_modules/openseadragon/build/openseadragon/openseadragon.min.js ] \
   || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  if command -v npm >/dev/null 2>&1; then
    npm ci --no-audit --no-fund --loglevel=error \
      || echo "slidepipe setup: npm ci failed; the viewer page will answer 503 until it works" >&2
  else
    echo "slidepipe setup: npm not found (apt-get install npm); the viewer needs OpenSeadragon" >&2
  fi
fi
