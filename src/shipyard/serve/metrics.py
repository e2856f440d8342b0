"""Prometheus metrics in an explicit registry object (no module globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LABELS = ("model", "version")


class ServerMetrics:
    """Every metric the server exports, registered in its own CollectorRegistry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "shipyard_inference_requests", "Inference requests by outcome.", (*_LABELS, "outcome"),
            registry=self.registry,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "shipyard_request_duration_seconds", "Inference request latency, arrival to response.", _LABELS,
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "shipyard_queue_duration_seconds", "Time requests wait in the batcher queue.", _LABELS,
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.compute_seconds = Histogram(
            "shipyard_compute_duration_seconds", "Model execution time per batch.", _LABELS,
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "shipyard_batch_size", "Samples per executed batch.", _LABELS, buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "shipyard_queue_depth", "Requests waiting in the batcher queue.", _LABELS, registry=self.registry
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
