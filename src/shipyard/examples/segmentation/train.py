"""Train the U-Net on generated shapes; report mean IoU on the held-out images.

Run: python train.py   (writes weights.safetensors next to this file; about a minute on 2 CPU cores)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from data import test_set, train_set  # noqa: E402
from model import UNet  # noqa: E402


def mean_iou(predicted: np.ndarray, truth: np.ndarray, classes: int = 3) -> float:
    ious = [((predicted == c) & (truth == c)).sum() / max(1, ((predicted == c) | (truth == c)).sum())
            for c in range(classes)]  # fmt: skip
    return float(np.mean(ious))


def main(epochs: int = 10) -> None:
    x, y = (torch.from_numpy(a) for a in train_set())
    torch.manual_seed(0)
    model = UNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            batch = order[i : i + 32]
            optimizer.zero_grad()
            scores = model(x[batch])
            torch.nn.functional.cross_entropy(scores.reshape(-1, 3), y[batch].reshape(-1)).backward()
            optimizer.step()
    model.eval()
    test_x, test_y = test_set()
    with torch.no_grad():
        predicted = model(torch.from_numpy(test_x)).argmax(-1).numpy()
    save_file(model.state_dict(), str(HERE / "weights.safetensors"))
    print(f"trained {epochs} epochs in {time.perf_counter() - start:.0f}s; held-out mean IoU "
          f"{mean_iou(predicted, test_y):.4f} (background, disc, square)")  # fmt: skip


if __name__ == "__main__":
    main()
