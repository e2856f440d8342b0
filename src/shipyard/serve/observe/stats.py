"""Per-model-version statistics: Triton-style counters for the statistics extension plus the Prometheus series."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from shipyard.serve.observe.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Histogram, ServerMetrics
from shipyard.serve.protocol.types import BatchStatistics, Duration, ModelStatistics


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def frozen(self) -> Duration:
        return Duration(self.count, self.ns)


@dataclass
class ModelStats:
    """Counters for one loaded model version; every update also moves its Prometheus series."""

    name: str
    version: int
    metrics: ServerMetrics
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_input: _Duration = field(default_factory=_Duration)
    compute: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, tuple[_Duration, _Duration, _Duration]] = field(default_factory=dict)

    queue_depth_now: int = 0
    request_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    queue_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    compute_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    first_token_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    generated_tokens: int = 0  # language models only

    def __post_init__(self) -> None:
        self.metrics.track(self)

    def outcome_counts(self) -> tuple[int, int]:
        return self.success.count, self.fail.count

    def histograms(self) -> dict[str, Histogram]:
        histograms = {
            "shipyard_request_duration_seconds": self.request_seconds,
            "shipyard_queue_duration_seconds": self.queue_seconds,
            "shipyard_compute_duration_seconds": self.compute_seconds,
            "shipyard_batch_size": self.batch_size,
        }
        if self.first_token_seconds.count:  # only models that generate text have this series
            histograms["shipyard_time_to_first_token_seconds"] = self.first_token_seconds
        return histograms

    def request_done(self, ok: bool, total_ns: int, samples: int) -> None:
        if ok:
            self.success.add(total_ns)
            self.inference_count += samples
        else:
            self.fail.add(total_ns)
        self.last_inference_ms = int(time.time() * 1000)
        self.request_seconds.observe(total_ns / 1e9)

    def generation_done(self, first_token_ns: int | None, tokens: int) -> None:
        """A language model's request: the time to its first piece of text, and the tokens it generated."""
        self.generated_tokens += tokens
        if first_token_ns is not None:
            self.first_token_seconds.observe(first_token_ns / 1e9)

    def queued(self, queue_ns: int) -> None:
        self.queue.add(queue_ns)
        self.queue_seconds.observe(queue_ns / 1e9)

    def batch_done(self, samples: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One executed batch: assembling its inputs, running the model, splitting the outputs."""
        self.execution_count += 1
        self.compute_input.add(input_ns)
        self.compute.add(infer_ns)
        self.compute_output.add(output_ns)
        per_size = self.batches.setdefault(samples, (_Duration(), _Duration(), _Duration()))
        for duration, ns in zip(per_size, (input_ns, infer_ns, output_ns), strict=True):
            duration.add(ns)
        self.compute_seconds.observe(infer_ns / 1e9)
        self.batch_size.observe(samples)

    def queue_depth(self, depth: int) -> None:
        self.queue_depth_now = depth

    def forget(self) -> None:
        """Drop this version's Prometheus series once it is unloaded."""
        self.metrics.forget(self)

    def snapshot(self) -> ModelStatistics:
        return ModelStatistics(
            name=self.name, version=str(self.version), last_inference_ms=self.last_inference_ms,
            inference_count=self.inference_count, execution_count=self.execution_count,
            success=self.success.frozen(), fail=self.fail.frozen(), queue=self.queue.frozen(),
            compute_input=self.compute_input.frozen(), compute_infer=self.compute.frozen(),
            compute_output=self.compute_output.frozen(),
            batches=[BatchStatistics(size, i.frozen(), c.frozen(), o.frozen())
                     for size, (i, c, o) in sorted(self.batches.items())],
        )  # fmt: skip
