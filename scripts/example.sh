#!/usr/bin/env bash
# One bundled example end to end, offline: write it, train it, build every spec in it, run it as a local
# service, query it with its client, stop the service.
# Usage: bash scripts/example.sh NAME   (chat, digits, recsys, segmentation, sensors, text, wine)
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: bash scripts/example.sh NAME}
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
folder=".examples/$name"
if [ -d "$folder" ]; then shipyard stop "$folder" || true; fi
rm -rf "$folder"
export SHIPYARD_REGISTRY="$PWD/.examples/registry"
shipyard init --example "$name" "$folder"
cd "$folder"
python train.py
shipyard build shipyard.yaml
for spec in *.yaml; do  # a second spec (text: intent.yaml) may be served by the first one's deploy section
    if [ "$spec" != shipyard.yaml ]; then shipyard build "$spec"; fi
done
shipyard apply
trap 'shipyard stop' EXIT
python client.py
