"""Per-model-version statistics: Triton-style counters for /stats plus the Prometheus series."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from shipyard.serve.metrics import ServerMetrics


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


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

    def __post_init__(self) -> None:
        labels = (self.name, str(self.version))
        m = self.metrics
        self._ok = m.requests.labels(*labels, "success")
        self._failed = m.requests.labels(*labels, "failure")
        self._request_seconds = m.request_seconds.labels(*labels)
        self._queue_seconds = m.queue_seconds.labels(*labels)
        self._compute_seconds = m.compute_seconds.labels(*labels)
        self._batch_size = m.batch_size.labels(*labels)
        self._depth = m.queue_depth.labels(*labels)

    def request_done(self, ok: bool, total_ns: int, samples: int) -> None:
        if ok:
            self.success.add(total_ns)
            self.inference_count += samples
            self._ok.inc()
        else:
            self.fail.add(total_ns)
            self._failed.inc()
        self.last_inference_ms = int(time.time() * 1000)
        self._request_seconds.observe(total_ns / 1e9)

    def queued(self, queue_ns: int) -> None:
        self.queue.add(queue_ns)
        self._queue_seconds.observe(queue_ns / 1e9)

    def batch_done(self, samples: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One executed batch: assembling its inputs, running the model, splitting the outputs."""
        self.execution_count += 1
        self.compute_input.add(input_ns)
        self.compute.add(infer_ns)
        self.compute_output.add(output_ns)
        per_size = self.batches.setdefault(samples, (_Duration(), _Duration(), _Duration()))
        for duration, ns in zip(per_size, (input_ns, infer_ns, output_ns), strict=True):
            duration.add(ns)
        self._compute_seconds.observe(infer_ns / 1e9)
        self._batch_size.observe(samples)

    def queue_depth(self, depth: int) -> None:
        self._depth.set(depth)

    def forget(self) -> None:
        """Drop this version's Prometheus series once it is unloaded."""
        labels = (self.name, str(self.version))
        for family in (self.metrics.request_seconds, self.metrics.queue_seconds, self.metrics.compute_seconds,
                       self.metrics.batch_size, self.metrics.queue_depth):  # fmt: skip
            family.remove(*labels)
        for outcome in ("success", "failure"):
            self.metrics.requests.remove(*labels, outcome)

    def snapshot(self) -> dict[str, Any]:
        """Triton's ModelStatistics layout (JSON field names as in its HTTP extension)."""
        zero = {"count": 0, "ns": 0}
        return {
            "name": self.name,
            "version": str(self.version),
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_input": self.compute_input.as_dict(),
                "compute_infer": self.compute.as_dict(),
                "compute_output": self.compute_output.as_dict(),
                "cache_hit": zero,
                "cache_miss": zero,
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": i.as_dict(),
                    "compute_infer": c.as_dict(),
                    "compute_output": o.as_dict(),
                }
                for size, (i, c, o) in sorted(self.batches.items())
            ],
        }
