"""Segment held-out images with the served U-Net over gRPC (tritonclient) and score the masks.

Run: python client.py [--url 127.0.0.1:8061]   (after `shipyard apply` or `shipyard serve shapes-unet`)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import tritonclient.grpc as grpcclient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import test_set
from train import mean_iou

SYMBOLS = ".o#"  # background, disc, square


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="127.0.0.1:8061")
    parser.add_argument("--count", type=int, default=32)
    args = parser.parse_args()
    images, masks = test_set()
    batch, truth = images[: args.count], masks[: args.count]
    client = grpcclient.InferenceServerClient(args.url)
    image = grpcclient.InferInput("image", list(batch.shape), "FP32")
    image.set_data_from_numpy(batch)
    start = time.perf_counter()
    result = client.infer("shapes-unet", [image])
    elapsed = (time.perf_counter() - start) * 1e3
    predicted = result.as_numpy("scores").argmax(-1)
    version = result.get_response().model_version
    print(f"shapes-unet version {version}: {len(batch)} images in one request ({elapsed:.1f} ms), "
          f"mean IoU {mean_iou(predicted, truth):.4f}")  # fmt: skip
    print("first image, predicted | true:")
    for row_p, row_t in zip(predicted[0][::2], truth[0][::2], strict=True):  # every other row: fits a terminal
        print("".join(SYMBOLS[v] for v in row_p), "|", "".join(SYMBOLS[v] for v in row_t))


if __name__ == "__main__":
    main()
