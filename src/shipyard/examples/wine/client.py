"""Classify a few held-out wines with the served pipeline (Open Inference Protocol, REST, JSON).

Run: python client.py [--url http://127.0.0.1:8010]   (after `shipyard apply` or `shipyard serve wine`)
"""

from __future__ import annotations

import argparse
import json
import urllib.request

import numpy as np

from shipyard.pipeline.datasets import sklearn_split
from shipyard.spec.models import SklearnDatasetSpec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8010")
    parser.add_argument("--count", type=int, default=10)
    args = parser.parse_args()
    split = SklearnDatasetSpec(kind="sklearn", name="wine", split="test", test_size=0.25, seed=0)
    _, rows, _, labels = sklearn_split(split)
    batch = rows[: args.count].astype(np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(batch.shape),
                        "data": batch.ravel().tolist()}], "outputs": [{"name": "label"}]}  # fmt: skip
    request = urllib.request.Request(f"{args.url}/v2/models/wine/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        reply = json.load(response)
    predicted = np.asarray(reply["outputs"][0]["data"]).reshape(-1)
    print(f"model {reply['model_name']} version {reply['model_version']}")
    print(f"predicted {predicted.tolist()}")
    print(f"labels    {labels[: args.count].tolist()}")
    print(f"{int((predicted == labels[: args.count]).sum())}/{len(batch)} correct")


if __name__ == "__main__":
    main()
