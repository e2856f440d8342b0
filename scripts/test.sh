#!/usr/bin/env bash
# Set up, lint, type-check and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check
ruff format --check
mypy
# pytest exits 5 when it collected nothing; that is a failure here like any other non-zero code.
pytest "$@"
