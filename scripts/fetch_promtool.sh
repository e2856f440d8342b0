#!/usr/bin/env bash
# Put Prometheus's promtool into .venv/bin (tests check the generated alert rules with it). Debian's
# prometheus package would start a server if installed, so it is only downloaded and unpacked.
# Idempotent; exits 0 without it when apt-get cannot fetch (the promtool tests are then skipped, saying why;
# the structural check of the exported files still runs).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SHIPYARD_VENV:-.venv}
[[ -x "$VENV/bin/promtool" ]] && exit 0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! (cd "$work" && apt-get download prometheus >/dev/null 2>&1); then
  echo "warning: could not download Debian's prometheus package; promtool checks will be skipped" >&2
  exit 0
fi
dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
cp "$work/root/usr/bin/promtool" "$VENV/bin/promtool"
