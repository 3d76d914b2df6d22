#!/usr/bin/env bash
# The whole test suite: install, check the layering contract, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
lint-imports --config pyproject.toml
python -m pytest "$@"
