"""The ONNX Runtime model runtime: load, infer, unload, and the conversions onnxruntime needs.

onnxruntime's Python binding takes and returns string tensors as `str` (it would store the repr() of
`bytes`), while the protocol's BYTES tensors are bytes: `prepare` turns a request's text inputs into str
before it is queued (so a bad one fails alone, not its whole batch), and outputs come back as bytes.
"""

from __future__ import annotations

import asyncio
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from shipyard import cpus
from shipyard.artifact.encryption import model_source
from shipyard.artifact.layout import verify_artifact
from shipyard.artifact.manifest import Manifest
from shipyard.errors import InvalidInputError, UnavailableError
from shipyard.onnxrt import TENSORRT, artifact_tensorrt, bounded_cost, random_feeds, session
from shipyard.spec.models import ServeSpec
from shipyard.tokenizer import TextEncoder, artifact_encoder

WARM_UP_RUNS = 5  # timed runs per batch size at warm-up; the fastest counts
WARM_UP_BUDGET_S = 0.2  # no more timed runs of a size once they took this long


def as_text(name: str, data: np.ndarray) -> np.ndarray:
    """BYTES elements as str, for onnxruntime and tokenizers; InvalidInputError if one is not UTF-8."""
    try:
        text = [x.decode("utf-8") for x in data.reshape(-1)]
    except UnicodeDecodeError:
        raise InvalidInputError(f"input {name!r}: BYTES elements for a string tensor must be UTF-8 text") from None
    return np.array(text, dtype=object).reshape(data.shape)


def _as_bytes(array: np.ndarray) -> np.ndarray:
    encoded = [x.encode() if isinstance(x, str) else x for x in array.reshape(-1)]
    return np.array(encoded, dtype=object).reshape(array.shape)


class OrtRuntime:
    """`instances` ONNX Runtime sessions, each used by one worker thread at a time."""

    def __init__(
        self, folder: Path, manifest: Manifest, settings: ServeSpec, encryption_key: bytes | None, workers: int = 1,
        tensorrt_cache: Path | None = None,
    ) -> None:  # fmt: skip
        self.folder = folder
        self.tensorrt_cache = tensorrt_cache
        self.workers = workers  # processes of the server, each with its own sessions
        self.manifest = manifest
        self.settings = settings
        self._key = encryption_key
        # What infer() takes: strings for text models (tokenized here), the graph's tensors otherwise
        # (a language model's decoder feeds the graph itself).
        self.signature = manifest.signature if manifest.generation is not None else manifest.served_signature
        self._text_inputs = [t.name for t in self.signature.inputs if t.dtype == "string"]
        self._text_outputs = [i for i, t in enumerate(manifest.signature.outputs) if t.dtype == "string"]
        self._text: TextEncoder | None = None  # text models: tokenized on the worker thread, after batching
        self.providers: list[str] = []
        self._sessions: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        self._executor: ThreadPoolExecutor | None = None

    def _create_sessions(self) -> None:
        verify_artifact(self.folder)  # refuse tampered files before any of them is parsed
        self._text = artifact_encoder(self.folder, self.manifest)
        source = model_source(self.folder, self.manifest, self._key)  # a path, or decrypted bytes in memory only
        threads = self.settings.threads(self.manifest.generation is not None)
        if threads == 0 and self.workers > 1:  # "every core" is shared by the workers
            threads = max(1, cpus.usable() // self.workers)
        wanted = self.settings.providers()
        tensorrt = None
        if TENSORRT in wanted and self.tensorrt_cache is not None:
            tensorrt = artifact_tensorrt(self.folder, self.manifest.content_hash, self.tensorrt_cache)
        for _ in range(self.settings.instances):
            created = session(source.model, threads, wanted, source.side_files, tensorrt)
            self._sessions.put(created)
        self.providers = created.get_providers()
        if self.settings.device != "cpu" and wanted[0] not in self.providers:
            raise UnavailableError(
                f"{self.manifest.name}:{self.manifest.version} needs {wanted[0]} "
                f"(serve.device: {self.settings.device}), "
                f"which this machine's onnxruntime does not offer (it has {', '.join(self.providers)}): install "
                "onnxruntime-gpu on a machine with an NVIDIA GPU, or set serve.device: cpu"
            )

    async def load(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=self.settings.instances, thread_name_prefix=f"ort-{self.manifest.name}"
        )
        await asyncio.get_running_loop().run_in_executor(self._executor, self._create_sessions)

    def prepare(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A request's inputs as the session takes them (text as str), before it is queued."""
        if not self._text_inputs:
            return feeds
        return {name: as_text(name, a) if name in self._text_inputs else a for name, a in feeds.items()}

    def run_sync(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run prepared feeds on the calling thread (worker threads, or the event loop for models fast enough)."""
        if self._text is not None:
            feeds = self._text.apply(feeds)
        session = self._sessions.get()
        try:
            outputs: list[np.ndarray] = session.run(None, feeds)
        finally:
            self._sessions.put(session)
        for index in self._text_outputs:
            outputs[index] = _as_bytes(outputs[index])
        return outputs

    def bounded_cost(self) -> bool:
        """Whether a batch's cost is set by its size alone (onnxrt.bounded_cost), so it may run inline. Asked
        only of models whose warm-up was fast enough, so a big model's graph is never parsed for it."""
        source = model_source(self.folder, self.manifest, self._key)
        graph = onnx.load_model_from_string(source.model) if isinstance(source.model, bytes) else onnx.load(
            str(source.model), load_external_data=False
        )  # fmt: skip
        return bounded_cost(graph, self.manifest.served_signature)

    @property
    def text_encoder(self) -> TextEncoder | None:
        """Text models: the tokenizer in front of the graph (set once the sessions are made)."""
        return self._text

    def exclusive_session(self) -> ort.InferenceSession:
        """One of the sessions, for a caller that binds its own buffers (a language model's scheduler)."""
        return self._sessions.get()

    async def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._executor is None:
            raise UnavailableError(f"{self.manifest.name}:{self.manifest.version} is not loaded")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.run_sync, feeds)

    async def warm_up(self, batch_sizes: list[int]) -> float:
        """Run every batch size in use on every instance, so no first request at a new size stalls.

        Returns the slowest batch's compute time in seconds: for each size the fastest of WARM_UP_RUNS timed
        runs after its warm-up run, so a busy machine at start-up (another worker loading) does not change it.
        """
        slowest = 0.0
        for size in batch_sizes:
            feeds = random_feeds(self.signature, batch=size, seed=size)  # text as str: already prepared
            await asyncio.gather(*(self.infer(feeds) for _ in range(self.settings.instances)))
            fastest, spent, runs = float("inf"), 0.0, 0
            while runs < WARM_UP_RUNS and (runs == 0 or spent < WARM_UP_BUDGET_S):  # a slow model: fewer runs
                start = time.perf_counter()
                await asyncio.get_running_loop().run_in_executor(self._executor, self.run_sync, feeds)
                took = time.perf_counter() - start
                fastest, spent, runs = min(fastest, took), spent + took, runs + 1
            slowest = max(slowest, fastest)
        return slowest

    async def unload(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        while not self._sessions.empty():
            self._sessions.get()
