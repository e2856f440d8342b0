from __future__ import annotations

import numpy as np
import pytest

from shipyard.errors import EvaluationError
from shipyard.pipeline.metrics import compute
from shipyard.spec.models import MetricSpec

SCORES = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
LABELS = np.array([1, 0, 1, 2])


def _metric(name: str, **kw: object) -> MetricSpec:
    return MetricSpec.model_validate({"name": name, **kw})


def test_accuracy_from_scores_and_from_labels() -> None:
    assert compute(_metric("accuracy"), SCORES, LABELS) == 0.5
    assert compute(_metric("accuracy"), np.array([1, 0, 2, 2]), LABELS) == 0.75


def test_macro_f1() -> None:
    # predictions 1,0,2,0 vs 1,0,1,2: class0 f1=2/3, class1 f1=2/3, class2 f1=0
    assert compute(_metric("f1"), SCORES, LABELS) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_top_k() -> None:
    assert compute(_metric("top_k", k=2), SCORES, LABELS) == 0.75
    with pytest.raises(EvaluationError, match="top_k needs class scores"):
        compute(_metric("top_k"), LABELS, LABELS)


def test_regression_metrics() -> None:
    pred, target = np.array([[1.0], [2.0], [4.0]]), np.array([1.0, 3.0, 2.0])
    assert compute(_metric("mse"), pred, target) == pytest.approx(5 / 3)
    assert compute(_metric("mae"), pred, target) == pytest.approx(1.0)


def test_cosine() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert compute(_metric("cosine"), a, a * 3) == pytest.approx(1.0)
    assert compute(_metric("cosine"), a, np.array([[0.0, 1.0], [0.0, -1.0]])) == pytest.approx(-0.5)


def test_mismatched_lengths_and_shapes() -> None:
    with pytest.raises(EvaluationError, match="3 predictions for 4 targets"):
        compute(_metric("accuracy"), SCORES[:3], LABELS)
    with pytest.raises(EvaluationError, match="do not match targets"):
        compute(_metric("mse"), np.zeros((4, 2)), np.zeros(4))


def test_mean_iou_on_masks_with_the_class_axis_last() -> None:
    truth = np.array([[[0, 0, 1], [0, 2, 2]]])  # one 2x3 mask
    scores = np.zeros((1, 2, 3, 3))
    for (row, col), cls in np.ndenumerate(np.array([[0, 1, 1], [0, 2, 0]])):
        scores[0, row, col, cls] = 1.0  # predicts 0,1,1 / 0,2,0
    # class 0: 2 shared of 4 in either → 1/2; class 1: 1 of 2 → 1/2; class 2: 1 of 2 → 1/2
    assert compute(_metric("iou"), scores, truth) == pytest.approx(0.5)
    assert compute(_metric("iou"), truth, truth) == 1.0
