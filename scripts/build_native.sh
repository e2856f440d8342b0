#!/usr/bin/env bash
# Build the native gRPC front end (native/grpc_front.cc) next to its Python module when gRPC's C++ library is
# at hand: installed already, or from Debian (libgrpc++-dev, when run as root). Without it the server serves
# gRPC with grpc.aio and nothing else changes. Rebuilds only when the source is newer than the library.
set -euo pipefail
cd "$(dirname "$0")/.."
src=native/grpc_front.cc
out=src/shipyard/serve/transports/libshipyard_grpc.so
[[ -f "$out" && "$out" -nt "$src" ]] && exit 0
have() { command -v g++ >/dev/null && pkg-config --exists grpc++ 2>/dev/null; }
if ! have && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q libgrpc++-dev pkg-config g++ >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libgrpc++-dev pkg-config g++ >/dev/null 2>&1; } \
    || true
fi
if ! have; then
  echo "native gRPC front end not built (needs g++ and libgrpc++-dev): gRPC is served by grpc.aio" >&2
  exit 0
fi
# shellcheck disable=SC2046  # pkg-config's flags are meant to split
g++ -O2 -std=c++17 -shared -fPIC -Wall "$src" $(pkg-config --cflags --libs grpc++) -o "$out.partial"
mv "$out.partial" "$out"
