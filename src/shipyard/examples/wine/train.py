"""Fit the wine pipeline on the training part of the split that shipyard.yaml evaluates on.

Run: python train.py   (writes model.skops next to this file; about a second)
"""

from __future__ import annotations

from pathlib import Path

import skops.io as sio
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from shipyard.pipeline.datasets import sklearn_split
from shipyard.spec import load_spec
from shipyard.spec.models import SklearnDatasetSpec

HERE = Path(__file__).resolve().parent


def main() -> None:
    spec = load_spec(HERE / "shipyard.yaml").spec
    assert spec.evaluation is not None
    assert isinstance(spec.evaluation.dataset, SklearnDatasetSpec)
    x_train, x_test, y_train, y_test = sklearn_split(spec.evaluation.dataset)  # the held-out part is never fitted
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, y_train)
    sio.dump(model, HERE / "model.skops")
    print(f"held-out accuracy {model.score(x_test, y_test):.4f}; wrote {HERE / 'model.skops'}")


if __name__ == "__main__":
    main()
