"""The two guards every candidate must pass: metric within budget (bootstrap bound) and faster than its parent."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from shipyard.pipeline import metrics
from shipyard.spec.models import MetricSpec, OptimizeSpec


@dataclass(frozen=True)
class MetricCheck:
    value: float  # the candidate's metric on the whole evaluation set
    drop: float  # loss versus the unoptimized model (positive = worse)
    drop_bound: float  # the bootstrap upper bound of the loss at the configured confidence
    budget: float

    @property
    def passed(self) -> bool:
        return self.drop_bound <= self.budget


def budget(spec: OptimizeSpec, base_value: float) -> float:
    return spec.max_drop * abs(base_value) if spec.relative else spec.max_drop


def check_metric(
    metric: MetricSpec, spec: OptimizeSpec, base: np.ndarray, candidate: np.ndarray, target: np.ndarray
) -> MetricCheck:
    """Paired bootstrap over the evaluation samples: a lucky draw cannot pass a worse model."""
    sign = 1.0 if metric.better == "maximize" else -1.0
    base_value = metrics.compute(metric, base, target)
    value = metrics.compute(metric, candidate, target)
    rng = np.random.default_rng(0)
    drops = np.empty(spec.bootstrap)
    for i in range(spec.bootstrap):
        idx = rng.integers(0, len(target), len(target))
        drops[i] = sign * (metrics.compute(metric, base[idx], target[idx]) - metrics.compute(metric, candidate[idx],
                                                                                           target[idx]))  # fmt: skip
    bound = float(np.quantile(drops, spec.confidence))
    return MetricCheck(value, sign * (base_value - value), max(bound, sign * (base_value - value)),
                       budget(spec, base_value))  # fmt: skip


def paired_p50_ms(
    parent: ort.InferenceSession, candidate: ort.InferenceSession, feeds: dict[str, np.ndarray], rounds: int = 200
) -> tuple[float, float]:
    """p50 latency of both models on `feeds`, timed alternately so machine noise hits both alike."""
    for _ in range(10):
        parent.run(None, feeds)
        candidate.run(None, feeds)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for session, bucket in ((parent, times[0]), (candidate, times[1])):
            start = time.perf_counter()
            session.run(None, feeds)
            bucket.append(time.perf_counter() - start)
    return float(np.median(times[0]) * 1e3), float(np.median(times[1]) * 1e3)
