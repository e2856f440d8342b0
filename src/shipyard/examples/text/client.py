"""Semantic search and intent detection against the served text models, sending plain strings.

Run: python client.py [--url http://127.0.0.1:8040]   (after `shipyard apply`, or
`shipyard serve minilm intent --http-port 8040`)
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BATCH = 32  # the served model's max_batch_size (shipyard.yaml)
LABELS = ["alarm", "music", "shopping", "weather"]  # intent.onnx's probability columns (train.py)
QUERIES = ["how do I keep my accounts safe", "what should I eat to stay healthy",
           "news about planets", "my bike race"]  # fmt: skip
UTTERANCES = ["could you play a little Mozart", "get me up at quarter past six", "is it chilly in Oslo",
              "we are out of butter, put it on the list", "set a five minute timer for the tea",
              "will it be stormy during my trip"]  # fmt: skip


def infer(url: str, model: str, texts: list[str]) -> tuple[np.ndarray, float]:
    """One request with a BYTES tensor of strings; returns the first output and the round trip in ms."""
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    request = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        reply = json.load(response)
    elapsed = (time.perf_counter() - start) * 1e3
    (output,) = reply["outputs"]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"]), elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8040")
    args = parser.parse_args()
    documents = (HERE / "corpus.txt").read_text().splitlines()
    parts = [infer(args.url, "minilm", documents[i : i + BATCH]) for i in range(0, len(documents), BATCH)]
    index = np.concatenate([part for part, _ in parts])
    print(f"indexed {len(documents)} documents in {len(parts)} requests ({sum(ms for _, ms in parts):.0f} ms): "
          f"embeddings {list(index.shape)}")  # fmt: skip
    for query in QUERIES:
        vector, ms = infer(args.url, "minilm", [query])
        scores = index @ vector[0]  # unit vectors: the dot product is the cosine similarity
        best = np.argsort(-scores)[:2]
        print(f"\nquery: {query!r} ({ms:.1f} ms)")
        for rank, i in enumerate(best, 1):
            print(f"  {rank}. {scores[i]:.3f}  {documents[i]}")
    probabilities, ms = infer(args.url, "intent", UTTERANCES)
    print(f"\nintents of {len(UTTERANCES)} new utterances ({ms:.1f} ms):")
    for text, row in zip(UTTERANCES, probabilities, strict=True):
        print(f"  {LABELS[int(row.argmax())]:<9} {row.max():.2f}  {text}")


if __name__ == "__main__":
    main()
