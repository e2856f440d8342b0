"""Quality metrics on model outputs against targets (numpy only: no optional extra needed)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from shipyard.errors import EvaluationError
from shipyard.spec.models import MetricSpec


def _labels(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Class labels from scores (argmax over the last axis) or labels as they are."""
    if pred.ndim == target.ndim + 1:
        return np.asarray(pred.argmax(axis=-1))
    if pred.shape != target.shape:
        raise EvaluationError(f"predictions of shape {list(pred.shape)} do not match targets {list(target.shape)}")
    return pred


def accuracy(pred: np.ndarray, target: np.ndarray, k: int) -> float:
    return float(np.mean(_labels(pred, target) == target))


def f1_macro(pred: np.ndarray, target: np.ndarray, k: int) -> float:
    labels = _labels(pred, target)
    scores = []
    for cls in np.union1d(labels, target):
        tp = np.sum((labels == cls) & (target == cls))
        fp = np.sum((labels == cls) & (target != cls))
        fn = np.sum((labels != cls) & (target == cls))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def top_k(pred: np.ndarray, target: np.ndarray, k: int) -> float:
    if pred.ndim != target.ndim + 1:
        raise EvaluationError(f"top_k needs class scores, got predictions of shape {list(pred.shape)}")
    top = np.argsort(-pred, axis=-1)[..., :k]
    return float(np.mean(np.any(top == target[..., None], axis=-1)))


def iou(pred: np.ndarray, target: np.ndarray, k: int) -> float:
    """Mean intersection over union over the classes seen in labels or predictions (segmentation masks)."""
    labels = _labels(pred, target)
    scores = [np.sum((labels == c) & (target == c)) / np.sum((labels == c) | (target == c))
              for c in np.union1d(labels, target)]  # fmt: skip
    return float(np.mean(scores))


def _values(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, t = pred.astype(np.float64), target.astype(np.float64)
    if p.size != t.size:
        raise EvaluationError(f"predictions of shape {list(pred.shape)} do not match targets {list(target.shape)}")
    return p.reshape(t.shape), t


def mse(pred: np.ndarray, target: np.ndarray, k: int) -> float:
    p, t = _values(pred, target)
    return float(np.mean((p - t) ** 2))


def mae(pred: np.ndarray, target: np.ndarray, k: int) -> float:
    p, t = _values(pred, target)
    return float(np.mean(np.abs(p - t)))


def cosine(pred: np.ndarray, target: np.ndarray, k: int) -> float:
    p, t = _values(pred, target)
    p, t = p.reshape(len(p), -1), t.reshape(len(t), -1)
    norms = np.linalg.norm(p, axis=1) * np.linalg.norm(t, axis=1)
    return float(np.mean(np.sum(p * t, axis=1) / np.maximum(norms, 1e-12)))


_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, int], float]] = {
    "accuracy": accuracy,
    "f1": f1_macro,
    "iou": iou,
    "top_k": top_k,
    "mse": mse,
    "mae": mae,
    "cosine": cosine,
}


def compute(metric: MetricSpec, pred: np.ndarray, target: np.ndarray) -> float:
    """The metric's value; EvaluationError when predictions and targets do not fit together."""
    if len(pred) != len(target):
        raise EvaluationError(f"{len(pred)} predictions for {len(target)} targets")
    return _METRICS[metric.name](pred, target, metric.k)
