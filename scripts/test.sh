#!/usr/bin/env bash
# The whole test suite: install, lint, check the layering contract and the types, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-test.sh
. .venv/bin/activate
ruff check .
lint-imports --config pyproject.toml
mypy  # config in pyproject.toml: strict on wsi/ and models/
python -m pytest "$@"
