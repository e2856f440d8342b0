"""What watches the traffic once an answer is ready: drift, feedback, the request log, shadow copies."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from shipyard.serve.core.loaded import TensorModel
from shipyard.serve.core.repository import ModelRepository
from shipyard.serve.observe.request_log import RequestLog
from shipyard.serve.policy.rollout import Rollout
from shipyard.serve.protocol.types import InferRequest


class AfterAnswer:
    """Runs on the event loop after each answered inference; shadow work is bounded and never awaited here."""

    def __init__(self, repository: ModelRepository, rollout: Rollout, drift_sample: float,
                 request_log: RequestLog | None) -> None:  # fmt: skip
        self.repository = repository
        self.rollout = rollout
        self.drift_sample = drift_sample  # share of requests binned for drift monitoring
        self.request_log = request_log
        self._shadow_tasks: set[asyncio.Task[None]] = set()  # referenced until done, or they may be collected

    def __call__(self, handle: TensorModel, request: InferRequest, feeds: dict[str, np.ndarray], samples: int,
                 outputs: list[np.ndarray], start_ns: int) -> None:  # fmt: skip
        if handle.drift is not None and self.rollout.rng.random() < self.drift_sample:
            handle.drift.observe(feeds, outputs)
        if handle.feedback is not None and request.id:
            handle.feedback.remember(request.id, outputs[handle.feedback_output])
        if self.request_log is not None:
            latency_ms = (time.perf_counter_ns() - start_ns) / 1e6
            named = dict(zip(handle.schema.output_order, outputs, strict=True))
            self.request_log.record(handle.name, handle.version, request.id, latency_ms, feeds, named)
        if handle.name not in self.rollout.shadow:
            return
        for shadow in self.rollout.shadows_for(handle.name, handle.version, self.repository.versions(handle.name)):
            target = self.repository.get(handle.name, str(shadow))
            if not isinstance(target, TensorModel):  # a version of another kind cannot shadow this one
                continue
            run = target.infer(feeds, samples)
            task = asyncio.create_task(self.rollout.compare(handle.name, shadow, run, outputs))
            self._shadow_tasks.add(task)
            task.add_done_callback(self._shadow_tasks.discard)
