"""Prometheus metrics: plain counters updated on the hot path, turned into metric families at scrape time.

prometheus_client's own metric objects take a lock and search buckets linearly on every update (several
microseconds each, six per request here); these histograms are a bisect and two additions, and the
explicit registry object reads them only when Prometheus scrapes. A scrape first takes a Snapshot: plain
data that the worker processes of one server send to their supervisor, which adds them up, so Prometheus
sees one set of series for the whole server.
"""

from __future__ import annotations

import bisect
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry
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

    def __add__(self, other: Histogram) -> Histogram:
        total = Histogram(self.bounds)
        total.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        total.count, total.sum = self.count + other.count, self.sum + other.sum
        return total

    def cumulative(self) -> list[tuple[str, float]]:
        running, out = 0, list[tuple[str, float]]()
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class Observed(Protocol):
    """What a snapshot reads from each loaded model version (see stats.ModelStats)."""

    name: str
    version: int
    queue_depth_now: int
    generated_tokens: int
    prompt_tokens: int
    reused_tokens: int
    scheduler: Any  # scheduler.SchedulerStats for language models, else None

    def outcome_counts(self) -> tuple[int, int]: ...

    def histograms(self) -> dict[str, Histogram]: ...


_HISTOGRAM_HELP = {
    "shipyard_request_duration_seconds": "Inference request latency, arrival to response.",
    "shipyard_queue_duration_seconds": "Time requests wait in the batcher queue.",
    "shipyard_compute_duration_seconds": "Model execution time per batch.",
    "shipyard_batch_size": "Samples per executed batch.",
    "shipyard_time_to_first_token_seconds": "Language models: request arrival to its first token.",
    "shipyard_inter_token_latency_seconds": "Language models: time between consecutive tokens of a request.",
}
Key = tuple[str, int]  # (model, version)
K = TypeVar("K")


@dataclass
class ModelFigures:
    """One version's figures at a scrape; `schedulers` weighs `cache_used` when several workers' are added."""

    success: int
    failure: int
    queue_depth: int
    histograms: dict[str, Histogram]
    language: bool = False
    generated_tokens: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    running: int = 0
    waiting: int = 0
    cache_used: float = 0.0
    schedulers: int = 0

    def __add__(self, other: ModelFigures) -> ModelFigures:
        histograms = add_by_key(self.histograms, other.histograms)
        schedulers = self.schedulers + other.schedulers
        return ModelFigures(
            self.success + other.success, self.failure + other.failure, self.queue_depth + other.queue_depth,
            histograms, self.language, self.generated_tokens + other.generated_tokens,
            self.prompt_tokens + other.prompt_tokens, self.reused_tokens + other.reused_tokens,
            self.running + other.running, self.waiting + other.waiting,
            (self.cache_used * self.schedulers + other.cache_used * other.schedulers) / max(schedulers, 1), schedulers,
        )  # fmt: skip

    def counts(self) -> ModelFigures:
        """Only what accumulates (requests, tokens, histograms): the gauges of a worker that is gone are zero."""
        return ModelFigures(self.success, self.failure, 0, self.histograms, self.language, self.generated_tokens,
                            self.prompt_tokens, self.reused_tokens)  # fmt: skip


def add_by_key(a: dict[K, Any], b: dict[K, Any]) -> dict[K, Any]:
    """Values under the same key added up; the others kept."""
    return {key: a[key] + b[key] if key in a and key in b else a.get(key, b.get(key)) for key in {**a, **b}}


@dataclass
class Snapshot:
    """Everything a scrape exports, as plain data; `+` adds two workers' snapshots."""

    models: dict[Key, ModelFigures] = field(default_factory=dict)
    shadow: dict[Key, Any] = field(default_factory=dict)  # rollout.ShadowCounts
    drift: dict[Key, tuple[dict[str, Any], Any]] = field(default_factory=dict)  # (reference, drift.DriftCounts)
    feedback: dict[Key, Any] = field(default_factory=dict)  # feedback.OnlineMetric
    worker_restarts: int = 0  # worker processes replaced after they died (the supervisor's count)

    def __add__(self, other: Snapshot) -> Snapshot:
        drift = {key: (a[0], a[1] + other.drift[key][1]) if key in other.drift else a for key, a in self.drift.items()}
        return Snapshot(
            add_by_key(self.models, other.models), add_by_key(self.shadow, other.shadow),
            {**other.drift, **drift}, add_by_key(self.feedback, other.feedback),
            self.worker_restarts + other.worker_restarts,
        )  # fmt: skip

    def counts(self) -> Snapshot:
        """What a worker had counted, to keep once it is gone so the summed counters never go back; its drift
        window and gauges are not kept (they describe the present)."""
        return Snapshot({key: m.counts() for key, m in self.models.items()}, dict(self.shadow), {}, dict(self.feedback))

    def within(self, live: Snapshot) -> Snapshot:
        """These counts, for the versions `live` still serves (an unloaded version's series go, as with one
        process)."""
        return Snapshot({k: m for k, m in self.models.items() if k in live.models},
                        {k: c for k, c in self.shadow.items() if k in live.models}, {},
                        {k: f for k, f in self.feedback.items() if k in live.models})  # fmt: skip


class ServerMetrics:
    """Every metric the server exports, in its own CollectorRegistry (no module globals)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._models: dict[Key, Observed] = {}
        self.retired: dict[Key, Observed] = {}  # unloaded versions' figures, resumed if they are loaded again
        self.shadow: dict[Key, Any] = {}  # (model, version) -> rollout.ShadowCounts
        self.drift: dict[Key, Any] = {}  # (model, version) -> drift.DriftMonitor
        self.feedback: dict[Key, Any] = {}  # (model, version) -> feedback.OnlineMetric
        self.registry.register(self)  # a custom collector: collect() below

    def track(self, stats: Observed) -> None:
        self._models[(stats.name, stats.version)] = stats

    def forget(self, stats: Observed) -> None:
        """Stop exporting a version's series, keeping its figures: loaded again, its counters go on from them
        (Prometheus counters never go back within a process)."""
        key = (stats.name, stats.version)
        if self._models.pop(key, None) is not None:
            self.retired[key] = stats

    def snapshot(self) -> Snapshot:
        """Copies of the figures now (call on the event-loop thread, which writes them)."""
        models = {}
        for key, stats in list(self._models.items()):
            success, failure = stats.outcome_counts()
            figures = ModelFigures(success, failure, stats.queue_depth_now,
                                   {n: copy.copy(h) for n, h in stats.histograms().items()})  # fmt: skip
            for histogram in figures.histograms.values():
                histogram.counts = list(histogram.counts)
            if stats.scheduler is not None:
                figures = replace(
                    figures, language=True, generated_tokens=stats.generated_tokens, prompt_tokens=stats.prompt_tokens,
                    reused_tokens=stats.reused_tokens,
                    running=stats.scheduler.running, waiting=stats.scheduler.waiting,
                    cache_used=stats.scheduler.cache_used, schedulers=1,
                )  # fmt: skip
            models[key] = figures
        return Snapshot(
            models, {key: copy.copy(counts) for key, counts in list(self.shadow.items())},
            {key: (monitor.reference, monitor.counts()) for key, monitor in list(self.drift.items())},
            {key: copy.copy(metric) for key, metric in list(self.feedback.items())},
        )  # fmt: skip

    def collect(self) -> Iterator[Metric]:
        yield from families(self.snapshot())


def families(snapshot: Snapshot) -> Iterator[Metric]:
    """The Prometheus metric families of a snapshot."""
    from shipyard.serve.observe.drift import report_of  # drift imports artifact code the metrics need only here

    labels = ["model", "version"]
    requests = CounterMetricFamily("shipyard_inference_requests", "Inference requests by outcome.",
                                   labels=[*labels, "outcome"])  # fmt: skip
    depth = GaugeMetricFamily("shipyard_queue_depth", "Requests waiting in the batcher queue.", labels=labels)
    histograms = {name: HistogramMetricFamily(name, text, labels=labels) for name, text in _HISTOGRAM_HELP.items()}
    tokens = CounterMetricFamily("shipyard_generated_tokens", "Tokens generated by language models.", labels=labels)
    prompt = CounterMetricFamily("shipyard_prompt_tokens", "Prompt tokens of language-model requests.", labels=labels)
    reused = CounterMetricFamily("shipyard_prompt_tokens_reused", "Prompt tokens whose key/value cache the prefix "
                                 "cache supplied (their share of shipyard_prompt_tokens is its hit ratio).",
                                 labels=labels)  # fmt: skip
    running = GaugeMetricFamily("shipyard_sequences_running", "Sequences being decoded.", labels=labels)
    waiting = GaugeMetricFamily("shipyard_sequences_waiting", "Sequences waiting for a slot.", labels=labels)
    cache = GaugeMetricFamily("shipyard_kv_cache_usage_ratio", "Key/value cache positions in use.", labels=labels)
    for (name, version), figures in snapshot.models.items():
        key = [name, str(version)]
        requests.add_metric([*key, "success"], figures.success)
        requests.add_metric([*key, "failure"], figures.failure)
        depth.add_metric(key, figures.queue_depth)
        for metric, histogram in figures.histograms.items():
            histograms[metric].add_metric(key, histogram.cumulative(), histogram.sum)
        if figures.language:
            tokens.add_metric(key, figures.generated_tokens)
            prompt.add_metric(key, figures.prompt_tokens)
            reused.add_metric(key, figures.reused_tokens)
            running.add_metric(key, figures.running)
            waiting.add_metric(key, figures.waiting)
            cache.add_metric(key, figures.cache_used)
    shadow = CounterMetricFamily("shipyard_shadow_requests", "Requests mirrored to shadow versions, by outcome.",
                                 labels=[*labels, "outcome"])  # fmt: skip
    for (name, version), counts in snapshot.shadow.items():
        for outcome in ("agree", "disagree", "error", "skipped"):
            shadow.add_metric([name, str(version), outcome], getattr(counts, outcome))
    inputs = GaugeMetricFamily("shipyard_input_drift_psi", "PSI of live inputs against the build's reference.",
                               labels=[*labels, "input", "feature"])  # fmt: skip
    predictions = GaugeMetricFamily(
        "shipyard_prediction_drift_psi", "PSI of live predictions against the build's reference.", labels=labels
    )
    window = GaugeMetricFamily("shipyard_drift_window_samples", "Samples in the drift window.", labels=labels)
    for (name, version), (reference, counts) in snapshot.drift.items():
        key = [name, str(version)]
        report = report_of(reference, counts)
        window.add_metric(key, report["window_samples"])
        predictions.add_metric(key, report["prediction_psi"])
        for tensor, values in report["inputs"].items():
            for feature, value in enumerate(values):
                inputs.add_metric([*key, tensor, str(feature)], value)
    labels = ["model", "version", "metric"]
    online = GaugeMetricFamily("shipyard_online_metric", "Metric over labels posted as feedback.", labels=labels)
    built = GaugeMetricFamily("shipyard_build_metric", "The same metric at build time.", labels=labels)
    count = CounterMetricFamily("shipyard_feedback", "Requests scored with posted labels.", labels=labels)
    for (name, version), metric in snapshot.feedback.items():
        key = [name, str(version), metric.metric]
        count.add_metric(key, metric.count)
        if metric.value is not None:
            online.add_metric(key, metric.value)
        if metric.built is not None:
            built.add_metric(key, metric.built)
    restarts = CounterMetricFamily("shipyard_worker_restarts", "Worker processes replaced after they died.")
    restarts.add_metric([], snapshot.worker_restarts)
    yield from (inputs, predictions, window, online, built, count, requests, depth, shadow, tokens, prompt, reused,
                running, waiting, cache, restarts, *histograms.values())  # fmt: skip
