"""The in-process ONNX Runtime timing loop every benchmark shares (the floor servers are compared with), on
sessions made by shipyard.onnxrt.session: the server's own session setup."""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort


def time_runs(session: ort.InferenceSession, feeds: dict[str, np.ndarray], seconds: float) -> dict[str, float]:
    """session.run in a loop for `seconds` after a warm-up: p50/p99 in ms and samples per second."""
    for _ in range(20):
        session.run(None, feeds)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    batch = len(next(iter(feeds.values())))
    return {
        "p50_ms": statistics.median(times) * 1e3,
        "p99_ms": float(np.percentile(times, 99)) * 1e3,
        "per_s": batch * len(times) / sum(times),
    }
