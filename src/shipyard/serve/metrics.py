"""Prometheus metrics: plain counters updated on the hot path, turned into metric families at scrape time.

prometheus_client's own metric objects take a lock and search buckets linearly on every update (several
microseconds each, six per request here); these histograms are a bisect and two additions, and the
explicit registry object reads them only when Prometheus scrapes.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    """Bucket counts and a sum; written from the event-loop thread only."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        running, out = 0, list[tuple[str, float]]()
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class Observed(Protocol):
    """What the collector reads from each loaded model version (see stats.ModelStats)."""

    name: str
    version: int
    queue_depth_now: int

    def outcome_counts(self) -> tuple[int, int]: ...

    def histograms(self) -> dict[str, Histogram]: ...


_HISTOGRAM_HELP = {
    "shipyard_request_duration_seconds": "Inference request latency, arrival to response.",
    "shipyard_queue_duration_seconds": "Time requests wait in the batcher queue.",
    "shipyard_compute_duration_seconds": "Model execution time per batch.",
    "shipyard_batch_size": "Samples per executed batch.",
}


class ServerMetrics:
    """Every metric the server exports, in its own CollectorRegistry (no module globals)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._models: dict[tuple[str, int], Observed] = {}
        self.shadow: dict[tuple[str, int], Any] = {}  # (model, version) -> rollout.ShadowCounts
        self.drift: dict[tuple[str, int], Any] = {}  # (model, version) -> drift.DriftMonitor
        self.feedback: dict[tuple[str, int], Any] = {}  # (model, version) -> feedback.OnlineMetric
        self.registry.register(self)  # a custom collector: collect() below

    def track(self, stats: Observed) -> None:
        self._models[(stats.name, stats.version)] = stats

    def forget(self, stats: Observed) -> None:
        self._models.pop((stats.name, stats.version), None)

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        requests = CounterMetricFamily("shipyard_inference_requests", "Inference requests by outcome.",
                                       labels=[*labels, "outcome"])  # fmt: skip
        depth = GaugeMetricFamily("shipyard_queue_depth", "Requests waiting in the batcher queue.", labels=labels)
        families = {name: HistogramMetricFamily(name, text, labels=labels) for name, text in _HISTOGRAM_HELP.items()}
        for stats in list(self._models.values()):
            key = [stats.name, str(stats.version)]
            success, failure = stats.outcome_counts()
            requests.add_metric([*key, "success"], success)
            requests.add_metric([*key, "failure"], failure)
            depth.add_metric(key, stats.queue_depth_now)
            for name, histogram in stats.histograms().items():
                families[name].add_metric(key, histogram.cumulative(), histogram.sum)
        shadow = CounterMetricFamily("shipyard_shadow_requests", "Requests mirrored to shadow versions, by outcome.",
                                     labels=[*labels, "outcome"])  # fmt: skip
        for (name, version), counts in list(self.shadow.items()):
            for outcome in ("agree", "disagree", "error", "skipped"):
                shadow.add_metric([name, str(version), outcome], getattr(counts, outcome))
        yield from self._drift_families()
        yield from self._feedback_families()
        yield requests
        yield depth
        yield shadow
        yield from families.values()

    def _drift_families(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        inputs = GaugeMetricFamily("shipyard_input_drift_psi", "PSI of live inputs against the build's reference.",
                                   labels=[*labels, "input", "feature"])  # fmt: skip
        predictions = GaugeMetricFamily(
            "shipyard_prediction_drift_psi", "PSI of live predictions against the build's reference.", labels=labels
        )
        window = GaugeMetricFamily("shipyard_drift_window_samples", "Samples in the drift window.", labels=labels)
        for (name, version), monitor in list(self.drift.items()):
            key = [name, str(version)]
            report = monitor.report()
            window.add_metric(key, report["window_samples"])
            predictions.add_metric(key, report["prediction_psi"])
            for tensor, values in report["inputs"].items():
                for feature, value in enumerate(values):
                    inputs.add_metric([*key, tensor, str(feature)], value)
        yield inputs
        yield predictions
        yield window

    def _feedback_families(self) -> Iterator[Metric]:
        labels = ["model", "version", "metric"]
        online = GaugeMetricFamily("shipyard_online_metric", "Metric over labels posted as feedback.", labels=labels)
        built = GaugeMetricFamily("shipyard_build_metric", "The same metric at build time.", labels=labels)
        count = CounterMetricFamily("shipyard_feedback", "Requests scored with posted labels.", labels=labels)
        for (name, version), metric in list(self.feedback.items()):
            key = [name, str(version), metric.metric]
            count.add_metric(key, metric.count)
            if metric.value is not None:
                online.add_metric(key, metric.value)
            if metric.built is not None:
                built.add_metric(key, metric.built)
        yield online
        yield built
        yield count

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
