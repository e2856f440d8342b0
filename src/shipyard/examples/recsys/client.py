"""Ask the served recommender for every user's top 10 (Open Inference Protocol, REST) and score recall@10.

Run: python client.py [--url http://127.0.0.1:8030]   (after `shipyard apply` or `shipyard serve recsys`)
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


def top_items(url: str, users: np.ndarray) -> np.ndarray:
    body = {"inputs": [{"name": "user", "datatype": "INT64", "shape": list(users.shape),
                        "data": users.ravel().tolist()}], "outputs": [{"name": "top_items"}]}  # fmt: skip
    request = urllib.request.Request(f"{url}/v2/models/recsys/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        (out,) = json.load(response)["outputs"]
    return np.asarray(out["data"]).reshape(out["shape"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8030")
    args = parser.parse_args()
    users, held_out = test_set()
    top = np.concatenate([top_items(args.url, users[i : i + 64]) for i in range(0, len(users), 64)])
    print(f"user 0: top 10 items {top[0].tolist()} (held-out item {held_out[0]})")
    print(f"recall@10 over {len(users)} users: {(top == held_out[:, None]).any(axis=1).mean():.3f}")


if __name__ == "__main__":
    main()
