"""A loaded version, as the data plane and the repository see it: one interface, two kinds of model.

A tensor model answers each request with one graph run, batched with others by its Batcher; a language model
answers token by token from its scheduler (decoder.py). Each kind owns how it starts (warm-up), stops and
which requests it takes; what they share (name, version, settings, statistics, schema) is the base class.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from shipyard.artifact.manifest import Manifest
from shipyard.artifact.reference import read_reference
from shipyard.errors import InvalidInputError
from shipyard.onnxrt import is_batchable
from shipyard.serve.core.batching import Batcher
from shipyard.serve.core.decoder import Decoder
from shipyard.serve.core.runtime import OrtRuntime
from shipyard.serve.observe.drift import DriftMonitor
from shipyard.serve.observe.feedback import SUPPORTED as FEEDBACK_METRICS
from shipyard.serve.observe.feedback import FeedbackStore
from shipyard.serve.observe.stats import ModelStats
from shipyard.serve.protocol.signature import ModelSchema
from shipyard.spec.models import EvaluationSpec, ServeSpec

logger = logging.getLogger(__name__)


class LoadedModel(ABC):
    """One loaded version: its runtime, settings, statistics and request schema."""

    def __init__(self, version: int, folder: Path, manifest: Manifest, settings: ServeSpec, runtime: OrtRuntime,
                 stats: ModelStats) -> None:  # fmt: skip
        self.name, self.version = manifest.name, version
        self.manifest, self.settings, self.runtime, self.stats = manifest, settings, runtime, stats
        self.batchable = is_batchable(manifest.served_signature)  # its inputs have a batch dimension
        self.schema = ModelSchema.of(manifest.served_signature)

    @property
    def max_batch_size(self) -> int:
        """The largest batch the server forms from separate requests (0: none are combined)."""
        return 0

    async def start(self) -> None:
        """Make the sessions and warm them up: ready for requests when this returns. A failure leaves nothing
        running (no sessions, threads or scheduler)."""
        try:
            await self.runtime.load()
            await self._warm_up()
        except BaseException:
            await self._release()
            raise

    async def stop(self) -> None:
        """Let admitted requests finish, then free the sessions."""
        await self._release()

    @abstractmethod
    async def _warm_up(self) -> None: ...

    async def _release(self) -> None:
        await self.runtime.unload()


class TensorModel(LoadedModel):
    """A model that answers a request with one graph run; requests queue in its batcher, which runs them on
    worker threads or, for a model that is fast and whose cost its input sizes bound, on the event loop."""

    def __init__(self, version: int, folder: Path, manifest: Manifest, settings: ServeSpec, runtime: OrtRuntime,
                 stats: ModelStats) -> None:  # fmt: skip
        super().__init__(version, folder, manifest, settings, runtime, stats)
        self.batcher = Batcher(
            runtime.infer, stats, max_batch_size=settings.max_batch_size if self.batchable else 0,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000, preferred_sizes=settings.preferred_batch_sizes,
            max_queue_size=settings.max_queue_size, instances=settings.instances,
        )  # fmt: skip
        self.drift = _drift_monitor(folder, manifest)  # when the build recorded reference distributions
        self.feedback, self.feedback_output = _feedback_store(manifest)  # when the build's metric scores online

    @property
    def max_batch_size(self) -> int:
        return self.batcher.max_batch_size if self.batchable else 0

    async def infer(self, feeds: dict[str, np.ndarray], samples: int) -> list[np.ndarray]:
        """Queue checked feeds (validate.py) and wait for their outputs."""
        return await self.batcher.submit(self.runtime.prepare(feeds), samples)

    def warm_up_sizes(self) -> list[int]:
        if not self.batchable or self.batcher.max_batch_size <= 1:
            return [1]
        sizes = {1, self.batcher.max_batch_size, *self.settings.preferred_batch_sizes}
        size = 2
        while size < self.batcher.max_batch_size:
            sizes.add(size)
            size *= 2
        return sorted(sizes)

    async def _warm_up(self) -> None:
        slowest = await self.runtime.warm_up(self.warm_up_sizes())
        inline_ms = self.settings.inline_max_ms
        if self.settings.instances == 1 and slowest * 1000 < inline_ms and self.runtime.bounded_cost():
            self.batcher.use_inline(self.runtime.run_sync)
        self.batcher.start()
        logger.info(
            "loaded %s:%s (%s; slowest warm-up batch %.2f ms, %s)", self.name, self.version,
            ", ".join(self.runtime.providers), slowest * 1000, "inline" if self.batcher.inline else "worker threads",
        )  # fmt: skip

    async def stop(self) -> None:
        await self.batcher.stop()
        await super().stop()


class LanguageModel(LoadedModel):
    """A model that generates token by token: its decoder (tokenizer, chat template) and the scheduler that
    feeds the graph; nothing goes through a batcher."""

    def __init__(self, version: int, folder: Path, manifest: Manifest, settings: ServeSpec, runtime: OrtRuntime,
                 stats: ModelStats) -> None:  # fmt: skip
        super().__init__(version, folder, manifest, settings, runtime, stats)
        self.decoder = Decoder(folder, manifest)

    async def _warm_up(self) -> None:
        step_s = await asyncio.to_thread(self.decoder.attach, self.runtime.exclusive_session())
        self.stats.scheduler = self.decoder.scheduler.stats
        logger.info("loaded %s:%s (%s; decode step of every slot %.2f ms)", self.name, self.version,
                    ", ".join(self.runtime.providers), step_s * 1000)  # fmt: skip

    async def _release(self) -> None:
        await asyncio.to_thread(self.decoder.detach)
        await super()._release()


def open_model(version: int, folder: Path, manifest: Manifest, settings: ServeSpec, runtime: OrtRuntime,
               stats: ModelStats) -> LoadedModel:  # fmt: skip
    """The kind of model the manifest describes (not started)."""
    kind = LanguageModel if manifest.generation is not None else TensorModel
    return kind(version, folder, manifest, settings, runtime, stats)


def language_model(model: LoadedModel) -> LanguageModel:
    """The model as a language model, or a 400 saying which route serves it instead."""
    if isinstance(model, LanguageModel):
        return model
    inputs = model.manifest.served_signature.inputs
    if len(inputs) == 1 and inputs[0].dtype == "string":  # text in, vectors out: an embedding model
        raise InvalidInputError(f"{model.name}:{model.version} is not a language model: it embeds text, so "
                                "use POST /v1/embeddings (or V2 infer)", param="model")  # fmt: skip
    raise InvalidInputError(f"{model.name}:{model.version} is not a language model: use V2 infer", param="model")


def tensor_model(model: LoadedModel) -> TensorModel:
    """The model as one answered by single graph runs, or a 400 pointing a language model to generation."""
    if isinstance(model, TensorModel):
        return model
    raise InvalidInputError(f"{model.name}:{model.version} is a language model: use /v1/completions, "
                            "/v1/chat/completions or /generate", param="model")  # fmt: skip


def _drift_monitor(folder: Path, manifest: Manifest) -> DriftMonitor | None:
    reference = read_reference(folder)
    names = [t.name for t in manifest.signature.outputs]
    if reference is None or reference.get("output") not in names:
        return None
    return DriftMonitor(reference, names.index(reference["output"]))


def _feedback_store(manifest: Manifest) -> tuple[FeedbackStore | None, int]:
    evaluation = (manifest.spec or {}).get("evaluation")
    if not evaluation:
        return None, 0
    spec = EvaluationSpec.model_validate(evaluation)
    if spec.metric.name not in FEEDBACK_METRICS:
        return None, 0
    names = [t.name for t in manifest.signature.outputs]
    index = names.index(spec.output) if spec.output in names else 0
    return FeedbackStore(spec.metric.name, manifest.metrics.get(spec.metric.name)), index
