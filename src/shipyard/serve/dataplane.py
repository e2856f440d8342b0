"""Everything REST and gRPC share: health, metadata, config, statistics, repository and inference.

Inputs and outputs are plain Python/numpy; the transports only decode and encode.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

import numpy as np

from shipyard import __version__
from shipyard.errors import InvalidInputError, NotFoundError, TimedOutError, TooLargeError
from shipyard.serve.generation import Generation
from shipyard.serve.repository import ModelHandle, ModelRepository
from shipyard.serve.request_log import RequestLog
from shipyard.serve.rollout import Rollout
from shipyard.serve.schema import TensorSchema
from shipyard.serve.types import InferRequest, InferResponse, Tensor

EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics", "model_repository"]


def _check_input(tensor: TensorSchema, datatype: str, shape: list[int]) -> None:
    if datatype != tensor.datatype:
        raise InvalidInputError(f"input {tensor.name!r}: datatype {datatype}, the model expects {tensor.datatype}")
    if len(shape) != len(tensor.shape):
        raise InvalidInputError(f"input {tensor.name!r}: shape {shape} does not have the rank of {tensor.shape}")
    for got, want in zip(shape, tensor.shape, strict=True):
        if want != -1 and got != want:
            raise InvalidInputError(f"input {tensor.name!r}: shape {shape} does not match {tensor.shape}")


def _as_text(name: str, data: np.ndarray) -> np.ndarray:
    # onnxruntime's Python binding passes string tensors as str (it would store repr() of bytes).
    try:
        text = [x.decode("utf-8") for x in data.reshape(-1)]
    except UnicodeDecodeError:
        raise InvalidInputError(f"input {name!r}: BYTES elements for a string tensor must be UTF-8 text") from None
    return np.array(text, dtype=object).reshape(data.shape)


def _version_parameter(parameters: dict[str, Any]) -> int | None:
    version = parameters.get("version")
    if version is None:
        return None
    if isinstance(version, int) or (isinstance(version, str) and version.isdigit()):
        return int(version)
    raise InvalidInputError(f"parameter 'version' must be a number, got {version!r}")


class DataPlane:
    """The transport-agnostic server API."""

    def __init__(
        self,
        repository: ModelRepository,
        *,
        timeout_s: float | None = None,
        max_elements: int | None = None,
        rollout: Rollout | None = None,
        drift_sample: float = 0.1,
        request_log: RequestLog | None = None,
    ) -> None:
        self.repository = repository
        self.request_log = request_log
        self.drift_sample = drift_sample  # share of requests binned for drift monitoring
        self.rollout = rollout or Rollout()
        self._shadow_tasks: set[asyncio.Task[None]] = set()  # referenced until done, or they may be collected
        self.timeout_s = timeout_s  # a request not answered by then gets a timeout error (504 / DEADLINE_EXCEEDED)
        self.max_elements = max_elements  # per input tensor: larger ones are refused before they are queued
        self.loading_done = False  # set once the start-up loads (and warm-ups) have finished

    # --- health and metadata -----------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.loading_done and not self.repository.failed

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "shipyard", "version": __version__, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str | None) -> bool:
        try:
            self.repository.get(name, version)
        except NotFoundError:
            return False
        return True

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        schema = self.repository.get(name, version).schema
        return {
            "name": name,
            "versions": [str(v) for v in self.repository.versions(name)],
            "platform": "onnxruntime_onnx",
            "inputs": [t.metadata() for t in schema.inputs.values()],
            "outputs": [t.metadata() for t in schema.outputs.values()],
        }

    def feedback(self, name: str, version: str | None, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Score posted labels ({"id", "label"}) against remembered predictions (an extension)."""
        handle = self.repository.get(name, version)
        if handle.feedback is None:
            raise NotFoundError(f"{name}:{handle.version} has no online metric (its build had no scorable evaluation)")
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("id"), str) or "label" not in item:
                raise InvalidInputError('feedback items are {"id": "<request id>", "label": <value>}')
        if len({item["id"] for item in items}) != len(items):
            raise InvalidInputError("each request id may appear once per feedback call")
        # Every label is scored before any is counted: a bad item leaves the online metric unchanged.
        scores = [handle.feedback.evaluate(item["id"], item["label"]) for item in items]
        for item, score in zip(items, scores, strict=True):
            handle.feedback.record(item["id"], score)
        online = handle.feedback.online
        return {"name": name, "version": str(handle.version), "metric": online.metric, "scored": len(scores),
                "online": online.value, "count": online.count, "build": online.built}  # fmt: skip

    def model_drift(self, name: str, version: str | None) -> dict[str, Any]:
        """Input and prediction PSI against the build's reference (an extension)."""
        handle = self.repository.get(name, version)
        if handle.drift is None:
            raise NotFoundError(f"{name}:{handle.version} has no reference distributions (built without evaluation)")
        return {"name": name, "version": str(handle.version), **handle.drift.report()}

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        """Triton's model configuration (JSON form): what perf_analyzer and tritonclient read."""
        handle = self.repository.get(name, version)
        batched = handle.batchable and handle.batcher.max_batch_size > 0

        def tensors(specs: dict[str, TensorSchema]) -> list[dict[str, Any]]:
            return [
                {"name": t.name, "data_type": "TYPE_STRING" if t.text else f"TYPE_{t.datatype}",
                 "dims": t.shape[1:] if batched else t.shape}
                for t in specs.values()
            ]  # fmt: skip

        config: dict[str, Any] = {
            "name": name,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "version_policy": {"latest": {"num_versions": 1}},
            "max_batch_size": handle.batcher.max_batch_size if batched else 0,
            "input": tensors(handle.schema.inputs),
            "output": tensors(handle.schema.outputs),
            "instance_group": [{"name": name, "kind": "KIND_CPU", "count": handle.settings.instances}],
        }
        if batched:
            config["dynamic_batching"] = {
                "preferred_batch_size": handle.settings.preferred_batch_sizes,
                "max_queue_delay_microseconds": int(handle.settings.max_queue_delay_ms * 1000),
            }
        return config

    def model_statistics(self, name: str | None, version: str | None) -> dict[str, Any]:
        if name is None:
            handles = self.repository.handles()
        elif version:
            handles = [self.repository.get(name, version)]
        else:
            handles = [self.repository.get(name, str(v)) for v in self.repository.versions(name)]
            if not handles:
                raise NotFoundError(f"model {name!r} is not loaded")
        return {"model_stats": [h.stats.snapshot() for h in handles]}

    # --- repository ----------------------------------------------------------------------------

    def repository_index(self) -> list[dict[str, str]]:
        loaded = {(h.name, h.version) for h in self.repository.handles()}
        index = []
        for record in self.repository.registry.all_versions():
            state = "READY" if (record.name, record.version) in loaded else "UNAVAILABLE"
            index.append({"name": record.name, "version": str(record.version), "state": state, "reason": ""})
        return index

    async def load_model(self, name: str, parameters: dict[str, Any]) -> None:
        """Load the newest registered version, or the one named by parameter `version` (an extension)."""
        version = _version_parameter(parameters)
        await self.repository.load(name if version is None else f"{name}:{version}")

    async def unload_model(self, name: str, parameters: dict[str, Any]) -> None:
        """Unload every loaded version, or only parameter `version`; queued requests finish first."""
        await self.repository.unload(name, _version_parameter(parameters))

    # --- inference -----------------------------------------------------------------------------

    async def infer(self, name: str, version: str | None, request: InferRequest) -> InferResponse:
        """Validate against the model's signature, batch, run, and select the requested outputs."""
        start = time.perf_counter_ns()
        if not version and name in self.rollout.canary:
            routed = self.rollout.route(name, self.repository.versions(name))
            version = str(routed) if routed is not None else None
        handle = self.repository.get(name, version)
        if handle.generator is not None:
            return await self.generate_text(name, str(handle.version), request)
        samples = 1
        try:
            self._check_requested(handle, request)
            feeds, samples = self._feeds(handle, request)
            outputs = await self._run(handle, feeds, samples)
        except TimeoutError:
            handle.stats.request_done(False, time.perf_counter_ns() - start, samples)
            raise TimedOutError(f"no answer within the {self.timeout_s:g} s request timeout") from None
        except BaseException:
            handle.stats.request_done(False, time.perf_counter_ns() - start, samples)
            raise
        response = self._response(handle, request, outputs)
        handle.stats.request_done(True, time.perf_counter_ns() - start, samples)
        self._after_answer(handle, request, feeds, samples, outputs, start)
        return response

    def generates(self, name: str, version: str | None) -> bool:
        """Whether the model is a language model (answers token by token)."""
        return self.repository.get(name, version).generator is not None

    def generate(self, name: str, version: str | None, request: InferRequest) -> Generation:
        """A validated generation for a language model: nothing runs until `stream` iterates it."""
        handle = self.repository.get(name, version)
        if handle.generator is None:
            raise InvalidInputError(f"{name}:{handle.version} is not a language model: use infer")
        self._check_requested(handle, request)
        feeds, _ = self._feeds(handle, request)
        return handle.generator.start(str(feeds["text_input"][0]), request.parameters)

    async def stream(self, generation: Generation) -> AsyncGenerator[str, None]:
        """Run a generation under the request timeout, counting it in its model's statistics."""
        # A deadline, not asyncio.timeout around the loop: that would also cover the consumer's awaits
        # between pieces, which run while this generator is suspended.
        deadline = None if self.timeout_s is None else asyncio.get_running_loop().time() + self.timeout_s
        stats = self.repository.get(generation.generator.name, generation.generator.version).stats
        start, ok, first = time.perf_counter_ns(), False, None
        try:
            async for piece in generation.run(deadline):
                first = first if first is not None else time.perf_counter_ns() - start
                yield piece
            ok = True
        except TimeoutError:
            raise TimedOutError(f"generation not finished within the {self.timeout_s:g} s request timeout") from None
        finally:
            stats.request_done(ok, time.perf_counter_ns() - start, 1)
            stats.generation_done(first, generation.usage.completion_tokens)

    async def generate_text(self, name: str, version: str | None, request: InferRequest) -> InferResponse:
        """A language model's whole answer as one `text_output` (plain infer, and /generate)."""
        generation = self.generate(name, version, request)
        text = "".join([piece async for piece in self.stream(generation)])
        output = Tensor("text_output", "BYTES", [1], np.array([text.encode()], dtype=object))
        generator = generation.generator
        return InferResponse(generator.name, generator.version, [output], request.id, generation.usage.parameters())

    def _after_answer(self, handle: ModelHandle, request: InferRequest, feeds: dict[str, np.ndarray], samples: int,
                      outputs: list[np.ndarray], start: int) -> None:  # fmt: skip
        """What watches the traffic once the answer is ready: drift, feedback, request log, shadows."""
        if handle.drift is not None and self.rollout.rng.random() < self.drift_sample:
            handle.drift.observe(feeds, outputs)
        if handle.feedback is not None and request.id:
            handle.feedback.remember(request.id, outputs[handle.feedback_output])
        if self.request_log is not None:
            latency_ms = (time.perf_counter_ns() - start) / 1e6
            named = dict(zip(handle.schema.output_order, outputs, strict=True))
            self.request_log.record(handle.name, handle.version, request.id, latency_ms, feeds, named)
        if handle.name not in self.rollout.shadow:
            return
        for shadow in self.rollout.shadows_for(handle.name, handle.version, self.repository.versions(handle.name)):
            run = self.repository.get(handle.name, str(shadow)).batcher.submit(feeds, samples)
            task = asyncio.create_task(self.rollout.compare(handle.name, shadow, run, outputs))
            self._shadow_tasks.add(task)
            task.add_done_callback(self._shadow_tasks.discard)

    async def _run(self, handle: ModelHandle, feeds: dict[str, np.ndarray], samples: int) -> list[np.ndarray]:
        if self.timeout_s is None:
            return await handle.batcher.submit(feeds, samples)
        async with asyncio.timeout(self.timeout_s):  # a deadline on this task; wait_for would add a task per request
            return await handle.batcher.submit(feeds, samples)

    def _feeds(self, handle: ModelHandle, request: InferRequest) -> tuple[dict[str, np.ndarray], int]:
        expected = handle.schema.inputs
        feeds: dict[str, np.ndarray] = {}
        for item in request.inputs:
            tensor = expected.get(item.name)
            if tensor is None:
                raise InvalidInputError(f"unexpected input {item.name!r}; the model takes {', '.join(expected)}")
            if item.name in feeds:
                raise InvalidInputError(f"input {item.name!r} given twice")
            _check_input(tensor, item.datatype, item.shape)
            if self.max_elements is not None and item.data.size > self.max_elements:
                raise TooLargeError(
                    f"input {item.name!r} has {item.data.size} elements; the limit is {self.max_elements}"
                )
            feeds[item.name] = _as_text(item.name, item.data) if tensor.text else item.data
        if len(feeds) != len(expected):
            raise InvalidInputError(f"missing inputs: {', '.join(n for n in expected if n not in feeds)}")
        if not handle.batchable:
            return feeds, 1
        sizes = {a.shape[0] for a in feeds.values()}
        if len(sizes) != 1:
            raise InvalidInputError(f"inputs disagree on the batch dimension: {sorted(sizes)}")
        return feeds, sizes.pop()

    @staticmethod
    def _check_requested(handle: ModelHandle, request: InferRequest) -> None:
        names = handle.schema.outputs
        for wanted in request.outputs or ():
            if wanted.name not in names:
                raise InvalidInputError(f"unknown output {wanted.name!r}; the model has {', '.join(sorted(names))}")

    @staticmethod
    def _response(handle: ModelHandle, request: InferRequest, outputs: list[np.ndarray]) -> InferResponse:
        schema = handle.schema
        by_name = dict(zip(schema.output_order, outputs, strict=True))
        wanted = [(o.name, o.parameters) for o in request.outputs] if request.outputs else None
        result = []
        for out_name, params in wanted or ((n, {}) for n in schema.output_order):
            array = by_name[out_name]
            datatype = schema.outputs[out_name].datatype
            if datatype == "BYTES":  # onnxruntime returns str; the wire carries bytes
                encoded = [x.encode() if isinstance(x, str) else x for x in array.reshape(-1)]
                array = np.array(encoded, dtype=object).reshape(array.shape)
            result.append(Tensor(out_name, datatype, list(array.shape), array, params))
        return InferResponse(handle.name, str(handle.version), result, request.id)
