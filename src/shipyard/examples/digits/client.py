"""Ask the served digits CNN about a few held-out images over the Open Inference Protocol (REST, JSON).

Run: python client.py [--url http://127.0.0.1:8000]   (after `shipyard apply` or `shipyard serve digits-cnn`)
Only the standard library and scikit-learn's bundled digits are used; any V2 client works the same way.
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
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--count", type=int, default=8)
    args = parser.parse_args()
    split = SklearnDatasetSpec(kind="sklearn", name="digits", split="test", test_size=0.25, seed=0)
    _, images, _, labels = sklearn_split(split)
    batch = images[: args.count].astype(np.float32)
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [len(batch), 1, 8, 8],
                        "data": batch.ravel().tolist()}]}  # fmt: skip
    request = urllib.request.Request(
        f"{args.url}/v2/models/digits-cnn/infer", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        reply = json.load(response)
    (logits,) = reply["outputs"]
    predicted = np.asarray(logits["data"]).reshape(logits["shape"]).argmax(1)
    print(f"model {reply['model_name']} version {reply['model_version']}")
    print(f"predicted {predicted.tolist()}")
    print(f"labels    {labels[: args.count].tolist()}")
    print(f"{int((predicted == labels[: args.count]).sum())}/{len(batch)} correct")


if __name__ == "__main__":
    main()
