"""The data plane: health, metadata, configuration, statistics and inference, shared by every transport.

It takes and returns domain types (shipyard.serve.protocol.types); each transport decodes its wire form
into them and renders its own wire form from them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

from shipyard import __version__
from shipyard.errors import NotFoundError, ShipyardError, TimedOutError
from shipyard.serve.core import embedding
from shipyard.serve.core.embedding import Embedded
from shipyard.serve.core.generation import TextGeneration
from shipyard.serve.core.loaded import LanguageModel, LoadedModel, TensorModel, tensor_model
from shipyard.serve.core.repository import ModelRepository
from shipyard.serve.core.routing import answering
from shipyard.serve.core.validate import check_outputs, feeds_of
from shipyard.serve.policy.rollout import Rollout
from shipyard.serve.protocol.signature import TensorSchema
from shipyard.serve.protocol.types import (
    ConfigTensor,
    InferRequest,
    InferResponse,
    ModelCard,
    ModelConfig,
    ModelMetadata,
    ModelStatistics,
    ServerMetadata,
    Tensor,
)

EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics", "model_repository"]
PLATFORM = "onnxruntime_onnx"
# After each answered request: (handle, request, feeds, samples, outputs, start in perf_counter ns).
AnswerHook = Callable[[TensorModel, InferRequest, dict[str, np.ndarray], int, list[np.ndarray], int], None]


def _config_tensors(specs: dict[str, TensorSchema], batched: bool) -> list[ConfigTensor]:
    return [ConfigTensor(t.name, "TYPE_STRING" if t.text else f"TYPE_{t.datatype}", t.shape[1:] if batched else t.shape)
            for t in specs.values()]  # fmt: skip


class DataPlane:
    """The transport-agnostic server API."""

    def __init__(
        self,
        repository: ModelRepository,
        generation: TextGeneration,
        *,
        rollout: Rollout,
        after_answer: AnswerHook,
        timeout_s: float | None,
        max_elements: int | None,
    ) -> None:
        self.repository = repository
        self.generation = generation
        self.rollout = rollout
        self.after_answer = after_answer
        self.timeout_s = timeout_s  # a request not answered by then gets a timeout error (504 / DEADLINE_EXCEEDED)
        self.max_elements = max_elements  # per input tensor: larger ones are refused before they are queued
        self.loading_done = False  # set once the start-up loads (and warm-ups) have finished

    # --- health and metadata -----------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Ready once start-up loading has finished: what failed is refused for good and reported in the index."""
        return self.loading_done

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata("shipyard", __version__, EXTENSIONS)

    def _answering(self, name: str, version: str | None, *, draw: bool = False) -> LoadedModel:
        return answering(self.repository, self.rollout, name, version, draw=draw)

    def draw(self, name: str, version: str | None) -> str:
        """The version that answers a request for `name`: the one it names, or one the rollout rules draw (a
        caller that reads the schema and then infers must use the same one, or a canary with another schema
        could answer)."""
        return str(self._answering(name, version, draw=True).version)

    def model_ready(self, name: str, version: str | None) -> bool:
        try:
            self._answering(name, version)
        except NotFoundError:
            return False
        return True

    def model_metadata(self, name: str, version: str | None) -> ModelMetadata:
        schema = self._answering(name, version).schema
        return ModelMetadata(
            name=name,
            versions=[str(v) for v in self.repository.versions(name)],
            platform=PLATFORM,
            inputs=[t.metadata() for t in schema.inputs.values()],
            outputs=[t.metadata() for t in schema.outputs.values()],
        )

    def model_config(self, name: str, version: str | None) -> ModelConfig:
        """Triton's model configuration: what perf_analyzer and tritonclient read."""
        handle = self._answering(name, version)
        batched = handle.max_batch_size > 0
        return ModelConfig(
            name=name, platform=PLATFORM, backend="onnxruntime", max_batch_size=handle.max_batch_size,
            inputs=_config_tensors(handle.schema.inputs, batched),
            outputs=_config_tensors(handle.schema.outputs, batched),
            instances=handle.settings.instances, preferred_batch_sizes=handle.settings.preferred_batch_sizes,
            max_queue_delay_us=int(handle.settings.max_queue_delay_ms * 1000), dynamic_batching=batched,
        )  # fmt: skip

    def model_statistics(self, name: str | None, version: str | None) -> list[ModelStatistics]:
        if name is None:
            handles = self.repository.handles()
        elif version:
            handles = [self.repository.get(name, version)]
        else:
            handles = [self.repository.get(name, str(v)) for v in self.repository.versions(name)]
            if not handles:
                raise NotFoundError(f"model {name!r} is not loaded")
        return [h.stats.snapshot() for h in handles]

    async def resolve(self, model_id: str) -> tuple[str, str | None]:
        """`NAME`, `NAME:VERSION` or `NAME@ALIAS` as (name, version or None); an alias is looked up in the
        registry off the event loop."""
        if "@" not in model_id:
            name, _, version = model_id.partition(":")
            return name, version or None
        try:
            record = await asyncio.to_thread(self.repository.resolve, model_id)
        except ShipyardError as exc:
            raise NotFoundError(f"model {model_id!r}: {exc}", param="model") from None
        return record.name, str(record.version)

    def cards(self) -> list[ModelCard]:
        """The newest loaded version of each model, with when it was built."""
        newest: dict[str, LoadedModel] = {}
        for model in self.repository.handles():
            if model.version >= getattr(newest.get(model.name), "version", 0):
                newest[model.name] = model
        return [ModelCard(n, str(newest[n].version), newest[n].manifest.created_at) for n in sorted(newest)]

    def card(self, name: str, version: str | None) -> ModelCard:
        model = self.repository.get(name, version)  # NotFoundError when it is not loaded
        return ModelCard(model.name, str(model.version), model.manifest.created_at)

    # --- inference -----------------------------------------------------------------------------

    async def embed(self, name: str, version: str | None, texts: list[str], dimensions: int | None) -> Embedded:
        """One vector per text from an embedding model (a tensor model with one text input)."""
        model = embedding.embedding_model(self._answering(name, version, draw=True))
        response = await self._infer(model, embedding.request_of(model, texts), time.perf_counter_ns())
        return embedding.embedded(model, texts, response, dimensions)

    async def infer(self, name: str, version: str | None, request: InferRequest) -> InferResponse:
        """Validate against the model's signature, batch, run, and select the requested outputs."""
        start = time.perf_counter_ns()
        handle = self._answering(name, version, draw=True)
        if isinstance(handle, LanguageModel):  # its whole answer
            return await self.generation.complete(await self.generation.start_on(handle, request), request)
        return await self._infer(tensor_model(handle), request, start)

    async def _infer(self, handle: TensorModel, request: InferRequest, start: int) -> InferResponse:
        samples = 1
        try:
            check_outputs(handle, request)
            feeds, samples = feeds_of(handle, request, self.max_elements)
            outputs = await self._run(handle, feeds, samples)
        except TimeoutError:
            handle.stats.request_done(False, time.perf_counter_ns() - start, samples)
            raise TimedOutError(f"no answer within the {self.timeout_s:g} s request timeout") from None
        except BaseException:
            handle.stats.request_done(False, time.perf_counter_ns() - start, samples)
            raise
        response = self._response(handle, request, outputs)
        handle.stats.request_done(True, time.perf_counter_ns() - start, samples)
        self.after_answer(handle, request, feeds, samples, outputs, start)
        return response

    async def _run(self, handle: TensorModel, feeds: dict[str, np.ndarray], samples: int) -> list[np.ndarray]:
        if self.timeout_s is None:
            return await handle.infer(feeds, samples)
        async with asyncio.timeout(self.timeout_s):  # a deadline on this task; wait_for would add a task per request
            return await handle.infer(feeds, samples)

    @staticmethod
    def _response(handle: LoadedModel, request: InferRequest, outputs: list[np.ndarray]) -> InferResponse:
        schema = handle.schema
        by_name = dict(zip(schema.output_order, outputs, strict=True))
        wanted = [(o.name, o.parameters) for o in request.outputs] if request.outputs else None
        result = []
        for out_name, params in wanted or ((n, {}) for n in schema.output_order):
            array = by_name[out_name]
            result.append(Tensor(out_name, schema.outputs[out_name].datatype, list(array.shape), array, params))
        return InferResponse(handle.name, str(handle.version), result, request.id)
