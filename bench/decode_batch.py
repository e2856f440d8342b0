"""One decode step of a language model's graph at batch 1, 4 and 16, for several weight formats of the same
model: does 4-bit keep its lead as the batch grows (MatMulNBits with int8 compute is fast at one row)?

Run:  .venv/bin/python bench/decode_batch.py VERSION_FOLDER [NAME=MODEL.onnx ...]
      (VERSION_FOLDER: a built version, whose manifest gives the cache layout and whose model.onnx is the
      first row; each NAME=PATH adds a graph of the same model, e.g. a rejected candidate kept from a build)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from shipyard.artifact.manifest import Manifest
from shipyard.kvcache import CacheSlots, StepRunner
from shipyard.onnxrt import session

BATCHES, CONTEXT_USED, ROUNDS = (1, 4, 16), 64, 5


def main() -> None:
    folder = Path(sys.argv[1])
    record = Manifest.model_validate_json((folder / "manifest.json").read_text()).generation
    assert record is not None, "not a language model"
    graphs = {"as built": folder / "model.onnx", **{a.split("=", 1)[0]: Path(a.split("=", 1)[1]) for a in sys.argv[2:]}}
    runners = {}
    for name, path in graphs.items():
        runner = StepRunner(session(path, threads=0), CacheSlots(record, max(BATCHES), np.dtype(np.float32)),
                            np.dtype(np.int64))  # fmt: skip
        runner.run(0, np.ones((max(BATCHES), CONTEXT_USED), dtype=np.int64), [CONTEXT_USED] * max(BATCHES))
        runners[name] = runner
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(ROUNDS):  # the graphs alternated in blocks, so machine noise hits all alike
        for batch in BATCHES:
            for name, runner in runners.items():
                ids = np.ones((batch, 1), dtype=np.int64)
                # One untimed run first: the previous graph's ONNX Runtime threads spin for a while after its
                # run and would take the cores from this one's first run.
                for timed in (False, True, True, True):
                    start = time.perf_counter()
                    runner.run(0, ids, [CONTEXT_USED + 1] * batch)
                    if timed:
                        times.setdefault((name, batch), []).append(time.perf_counter() - start)
    print("| weights | " + " | ".join(f"batch {b} ms" for b in BATCHES) + f" | tok/s at {max(BATCHES)} |")
    print("|---|" + "---:|" * (len(BATCHES) + 1))
    for name in graphs:
        ms = [float(np.median(times[(name, b)])) * 1e3 for b in BATCHES]
        print(f"| {name} | " + " | ".join(f"{m:.2f}" for m in ms) + f" | {max(BATCHES) / ms[-1] * 1e3:.0f} |")


if __name__ == "__main__":
    main()
