#!/usr/bin/env bash
# Create .venv and install Shipyard with every extra and the dev tools. Idempotent: it reinstalls only
# when pyproject.toml or constraints.txt changed. torch comes from the pinned CPU wheel
# (constraints.txt), so no dependency can pull another (multi-GB CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${SHIPYARD_VENV:-.venv}
stamp="$VENV/.shipyard-installed"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  SHIPYARD_VENV="$VENV" bash scripts/fetch_promtool.sh
  bash scripts/build_native.sh
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -c constraints.txt "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[all,dev]"
"$VENV/bin/python" -c "import shipyard, torch, onnxruntime, sklearn, skl2onnx" # fail loudly if an install failed
SHIPYARD_VENV="$VENV" bash scripts/fetch_promtool.sh
bash scripts/build_native.sh
echo "$want" > "$stamp"
