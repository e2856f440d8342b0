"""Per-model-version statistics: Triton-style counters for the statistics extension plus the Prometheus series."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shipyard.serve.observe.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Histogram, ServerMetrics
from shipyard.serve.protocol.types import BatchStatistics, Duration, ModelStatistics

if TYPE_CHECKING:  # the serving core imports this module
    from shipyard.serve.core.decoder import Generation
    from shipyard.serve.core.scheduler import SchedulerStats


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
    token_gap_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    generated_tokens: int = 0  # language models only
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt positions whose key/value cache came from the prefix cache
    scheduler: SchedulerStats | None = None  # language models: their continuous-batching scheduler

    def __post_init__(self) -> None:
        self.metrics.track(self)

    @classmethod
    def of(cls, name: str, version: int, metrics: ServerMetrics) -> ModelStats:
        """A loaded version's statistics: those it had when it was unloaded, if it was, else new ones."""
        retired = metrics.retired.pop((name, version), None)
        if not isinstance(retired, ModelStats):
            return cls(name, version, metrics)
        retired.scheduler, retired.queue_depth_now = None, 0  # a new load's scheduler attaches its own
        metrics.track(retired)
        return retired

    def outcome_counts(self) -> tuple[int, int]:
        return self.success.count, self.fail.count

    def histograms(self) -> dict[str, Histogram]:
        histograms = {
            "shipyard_request_duration_seconds": self.request_seconds,
            "shipyard_queue_duration_seconds": self.queue_seconds,
            "shipyard_compute_duration_seconds": self.compute_seconds,
            "shipyard_batch_size": self.batch_size,
        }
        if self.scheduler is not None:  # only models that generate text have these series
            histograms["shipyard_time_to_first_token_seconds"] = self.first_token_seconds
            histograms["shipyard_inter_token_latency_seconds"] = self.token_gap_seconds
            histograms["shipyard_batch_size"] = self.scheduler.step_batch
        return histograms

    def request_done(self, ok: bool, total_ns: int, samples: int) -> None:
        if ok:
            self.success.add(total_ns)
            self.inference_count += samples
        else:
            self.fail.add(total_ns)
        self.last_inference_ms = int(time.time() * 1000)
        self.request_seconds.observe(total_ns / 1e9)

    def generation_done(self, generation: Generation) -> None:
        """A language model's request: time to first token, the gaps between tokens, queue time, token counts."""
        self.generated_tokens += generation.usage.completion_tokens
        self.prompt_tokens += generation.usage.prompt_tokens
        self.reused_tokens += generation.usage.prompt_tokens - generation.usage.computed_tokens
        if generation.first_token_s is not None:
            self.first_token_seconds.observe(generation.first_token_s)
            self.queued(int((generation.queued_s or 0.0) * 1e9))
        for gap in generation.token_gaps:
            self.token_gap_seconds.observe(gap)

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
