"""Peak resident memory while a model with external weights is loaded, against the size of its weights.

A chain of MatMul layers with random float32 weights (1 GiB by default) is saved with its weights in a side
file and registered (plain and sealed with a key); weights under the 1.8 GB single-file limit get the limit
lowered to 256 MiB so they keep the layout a model over 2 GB has (`--gib 2` or more is such a model); each
version is loaded by a fresh process the way the server loads it (`model_source` + `session`, one run). The
process reports its peak RSS (VmHWM) and its RSS before loading; the table gives both against the weights.

Run:  .venv/bin/python bench/load_memory.py [--gib 1.0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _timing import matmul_chain

from shipyard import memory, onnxrt
from shipyard.pipeline import import_onnx
from shipyard.registry import LocalRegistry

WIDTH = 4096  # one layer: 4096 x 4096 float32 = 64 MiB

PROBE = """
import json, sys
from pathlib import Path
import numpy as np
WIDTH = int(sys.argv[1])

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
    return int(line.split()[1]) * 1024

from shipyard.artifact.encryption import model_source
from shipyard.artifact.layout import read_manifest
from shipyard.onnxrt import session
folder, key = Path(sys.argv[2]), (bytes.fromhex(sys.argv[3]) if len(sys.argv) > 3 else None)
before = status("VmRSS:")
source = model_source(folder, read_manifest(folder), key)
s = session(source.model, side_files=source.side_files)
del source
s.run(None, {"x": np.ones((1, WIDTH), dtype=np.float32)})
print(json.dumps({"before": before, "peak": status("VmHWM:"), "after": status("VmRSS:")}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    layers = max(1, round(args.gib * 16))
    if args.gib * 2**30 < onnxrt._SINGLE_FILE_LIMIT:  # a model this small keeps its weights in model.onnx.data
        onnxrt._SINGLE_FILE_LIMIT = 256 << 20  # only with a lower limit; one of 2 GiB or more needs no help
    rows = []
    with tempfile.TemporaryDirectory(prefix="load-memory-") as scratch:
        root = Path(scratch)
        matmul_chain(root / "chain.onnx", layers, WIDTH)
        registry = LocalRegistry(root / "registry")
        key = bytes(range(32))
        import_onnx(root / "chain.onnx", "plain", registry)
        import_onnx(root / "chain.onnx", "sealed", registry, encryption_key=key)
        for name, extra in (("plain", []), ("sealed", [key.hex()])):
            folder = registry.path(registry.resolve(name))
            done = subprocess.run([sys.executable, "-c", PROBE, str(WIDTH), str(folder), *extra], capture_output=True,
                                  text=True, check=True)  # fmt: skip
            figures = json.loads(done.stdout)
            weights = memory.weight_bytes(folder, registry.manifest(name))
            rows.append((name, weights, figures, memory.estimate(folder, registry.manifest(name), 1)))
    print("| version | weights MiB | RSS before MiB | peak RSS MiB | peak - before | / weights | RSS after MiB | "
          "estimate MiB |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, weights, f, estimate in rows:
        grown = f["peak"] - f["before"]
        print(f"| {name} | {weights / 2**20:,.0f} | {f['before'] / 2**20:,.0f} | {f['peak'] / 2**20:,.0f} | "
              f"{grown / 2**20:,.0f} | {grown / weights:.2f}x | {f['after'] / 2**20:,.0f} | "
              f"{estimate / 2**20:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
