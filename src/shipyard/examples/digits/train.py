"""Train the digits CNN on the training part of the split that shipyard.yaml evaluates on.

Run: python train.py   (writes weights.safetensors next to this file; about 10 s on 2 CPU cores)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from shipyard.pipeline.datasets import sklearn_split
from shipyard.spec import load_spec
from shipyard.spec.models import SklearnDatasetSpec

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from model import DigitsCNN  # noqa: E402


def main(epochs: int = 40) -> None:
    spec = load_spec(HERE / "shipyard.yaml").spec
    assert spec.evaluation is not None
    assert isinstance(spec.evaluation.dataset, SklearnDatasetSpec)
    # The same split the build evaluates on: the held-out part is never trained on.
    x_train, x_test, y_train, y_test = sklearn_split(spec.evaluation.dataset)
    x = torch.tensor(x_train, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y_train, dtype=torch.long)

    torch.manual_seed(0)
    model = DigitsCNN(**spec.model.init_args)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            batch = order[i : i + 64]
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        test_x = torch.tensor(x_test, dtype=torch.float32).reshape(-1, 1, 8, 8)
        accuracy = (model(test_x).argmax(1).numpy() == y_test).mean()
    save_file(model.state_dict(), str(HERE / "weights.safetensors"))
    print(f"trained {epochs} epochs in {time.perf_counter() - start:.1f}s; held-out accuracy {accuracy:.4f}")
    print(f"wrote {HERE / 'weights.safetensors'}")


if __name__ == "__main__":
    main()
