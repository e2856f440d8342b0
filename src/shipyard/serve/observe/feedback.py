"""Ground truth after the fact: labels posted for earlier request ids, scored into an online metric.

Predictions of requests that carry an `id` are remembered (a bounded, oldest-first cache per model
version). A label posted later for that id is scored with the model's evaluation metric, accuracy for
class scores and squared or absolute error for values, and the running figure is exported next to the
build-time value, so an alert can compare the two.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from shipyard.errors import InvalidInputError, NotFoundError

SUPPORTED = ("accuracy", "mse", "mae")


@dataclass
class OnlineMetric:
    metric: str
    built: float | None  # the build-time value, for comparison
    count: int = 0
    total: float = 0.0

    @property
    def value(self) -> float | None:
        return self.total / self.count if self.count else None

    def __add__(self, other: OnlineMetric) -> OnlineMetric:
        return OnlineMetric(self.metric, self.built, self.count + other.count, self.total + other.total)


class FeedbackStore:
    def __init__(self, metric: str, built: float | None, capacity: int = 10_000) -> None:
        if metric not in SUPPORTED:
            raise InvalidInputError(f"online metric {metric!r} is not supported (use one of {', '.join(SUPPORTED)})")
        self.online = OnlineMetric(metric, built)
        self.capacity = capacity
        self._predictions: OrderedDict[str, np.ndarray] = OrderedDict()

    def remember(self, request_id: str, output: np.ndarray) -> None:
        self._predictions[request_id] = output
        self._predictions.move_to_end(request_id)
        while len(self._predictions) > self.capacity:
            self._predictions.popitem(last=False)

    def knows(self, request_id: str) -> bool:
        """Whether this version answered `request_id` and its prediction is still remembered."""
        return request_id in self._predictions

    def evaluate(self, request_id: str, label: object) -> float:
        """Score the remembered prediction of `request_id` against `label`, changing nothing."""
        output = self._predictions.get(request_id)
        if output is None:
            raise NotFoundError(f"no remembered prediction for request id {request_id!r} (unknown or too old)")
        try:
            truth = np.asarray(label, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidInputError(f"label for {request_id!r} must be a number or a list of numbers") from None
        flat = output.reshape(len(output), -1)
        if self.online.metric == "accuracy":
            predicted = flat.argmax(axis=1) if flat.shape[1] > 1 else np.rint(flat[:, 0])
            if truth.size != len(predicted):
                raise InvalidInputError(f"request {request_id!r} had {len(predicted)} samples, got {truth.size} labels")
            sample = float(np.mean(predicted == truth.reshape(-1)))
        else:
            if truth.size != flat.size:
                raise InvalidInputError(f"request {request_id!r} predicted {flat.size} values, got {truth.size}")
            diff = flat.reshape(-1) - truth.reshape(-1)
            sample = float(np.mean(diff**2) if self.online.metric == "mse" else np.mean(np.abs(diff)))
        return sample

    def record(self, request_id: str, sample: float) -> None:
        """Count an evaluated label; its prediction is forgotten, so it is scored once."""
        del self._predictions[request_id]
        self.online.count += 1
        self.online.total += sample
