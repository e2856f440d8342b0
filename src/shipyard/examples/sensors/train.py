"""Train the fault detector on generated signals; report precision and recall on the held-out set.

Run: python train.py   (writes weights.safetensors next to this file; about 20 s on 2 CPU cores)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from sklearn.metrics import precision_score, recall_score

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from data import test_set, train_set  # noqa: E402
from model import FaultLSTM  # noqa: E402


def main(epochs: int = 20) -> None:
    x, y = (torch.from_numpy(a) for a in train_set())
    torch.manual_seed(0)
    model = FaultLSTM()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            batch = order[i : i + 64]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    test_x, test_y = test_set()
    with torch.no_grad():
        predicted = model(torch.from_numpy(test_x)).argmax(1).numpy()
    save_file(model.state_dict(), str(HERE / "weights.safetensors"))
    print(f"trained {epochs} epochs in {time.perf_counter() - start:.1f}s; held-out precision "
          f"{precision_score(test_y, predicted):.3f}, recall {recall_score(test_y, predicted):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
