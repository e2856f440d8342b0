#!/usr/bin/env bash
# The end-to-end demo, offline: write the bundled digits example, train it, build it into a registry.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
demo=${DEMO_DIR:-.demo}
rm -rf "$demo"
shipyard init --example digits "$demo/digits"
python "$demo/digits/train.py"
shipyard build "$demo/digits/shipyard.yaml" --registry "$demo/registry"
shipyard models list --registry "$demo/registry"
