"""Prefill of one prompt through a built language model's graph: logits at every position (the exported
graph, what the build scores) against the last position only (what the artifact now serves).

Run:  .venv/bin/python bench/prefill_logits.py REGISTRY/models/NAME/VERSION   (a version built before the
      change, whose graph still has every position; the script makes the cut copy itself)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from shipyard.artifact.manifest import Manifest
from shipyard.pipeline.scoring import Scorer
from shipyard.pipeline.serve_graph import last_position_logits


def main() -> None:
    folder = Path(sys.argv[1])
    record = Manifest.model_validate_json((folder / "manifest.json").read_text()).generation
    assert record is not None, "not a language model"
    model = onnx.load(str(folder / "model.onnx"))
    if not last_position_logits(model):
        raise SystemExit("no output projection writes `logits`")
    with tempfile.TemporaryDirectory() as scratch:
        cut_path = Path(scratch) / "model.onnx"
        onnx.save(model, str(cut_path))
        whole, cut = Scorer(folder / "model.onnx", record), Scorer(cut_path, record)
        print("| prompt tokens | every position ms | last position ms | speed-up |")
        print("|---:|---:|---:|---:|")
        for tokens in (16, 128, 512):
            ids = (np.arange(tokens)[None] * 7919) % 1000 + 10
            times: dict[str, list[float]] = {"whole": [], "cut": []}
            for _ in range(7):  # alternated, so machine noise hits both alike
                for name, scorer in (("whole", whole), ("cut", cut)):
                    start = time.perf_counter()
                    scorer.runner.run(0, ids, [tokens])
                    times[name].append(time.perf_counter() - start)
            a, b = (float(np.median(times[k])) * 1e3 for k in ("whole", "cut"))
            print(f"| {tokens} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
