#!/usr/bin/env bash
# The end-to-end demo, offline: write the bundled digits example, train it, build it into a registry,
# size it, run it as a local service and query it, render the Kubernetes manifests, then stop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
demo=${DEMO_DIR:-.demo}
if [ -d "$demo/digits" ]; then shipyard stop "$demo/digits" || true; fi
rm -rf "$demo"
export SHIPYARD_REGISTRY="$PWD/$demo/registry"
shipyard init --example digits "$demo/digits"
python "$demo/digits/train.py"
shipyard build "$demo/digits"
shipyard models list
shipyard capacity digits-cnn --qps 2000 --p99 20ms --spec "$demo/digits"
shipyard apply "$demo/digits"
trap 'shipyard stop "$demo/digits"' EXIT
python "$demo/digits/client.py"
shipyard status "$demo/digits"
shipyard apply "$demo/digits" --target kubernetes
shipyard plan "$demo/digits" --target kubernetes
