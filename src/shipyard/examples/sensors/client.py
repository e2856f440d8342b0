"""Score held-out sensor windows with the served detector (Open Inference Protocol, REST, binary-free JSON).

Run: python client.py [--url http://127.0.0.1:8020]   (after `shipyard apply` or `shipyard serve sensors`)
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import test_set


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8020")
    parser.add_argument("--count", type=int, default=64)
    args = parser.parse_args()
    windows, labels = test_set()
    batch, truth = windows[: args.count], labels[: args.count]
    body = {"inputs": [{"name": "signals", "datatype": "FP32", "shape": list(batch.shape),
                        "data": batch.ravel().tolist()}]}  # fmt: skip
    request = urllib.request.Request(f"{args.url}/v2/models/sensors/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        reply = json.load(response)
    (logits,) = reply["outputs"]
    predicted = np.asarray(logits["data"]).reshape(logits["shape"]).argmax(1)
    hits = int(((predicted == 1) & (truth == 1)).sum())
    print(f"model {reply['model_name']} version {reply['model_version']}: {len(batch)} windows, "
          f"{int(truth.sum())} with a fault")  # fmt: skip
    print(f"flagged {int(predicted.sum())}: precision {hits / max(1, predicted.sum()):.3f}, "
          f"recall {hits / max(1, truth.sum()):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
