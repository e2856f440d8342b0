"""The model runtime interface (load / infer / unload) and its ONNX Runtime implementation."""

from __future__ import annotations

import asyncio
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from shipyard.artifact.encryption import model_source
from shipyard.artifact.layout import verify_artifact
from shipyard.artifact.manifest import Manifest
from shipyard.errors import ModelLoadError
from shipyard.pipeline._onnx import random_feeds
from shipyard.pipeline.text import TextEncoder, artifact_encoder
from shipyard.spec.models import ServeSpec, SignatureSpec


class ModelRuntime(Protocol):
    """What the server needs from a loaded model. Blocking work runs off the event loop."""

    signature: SignatureSpec

    async def load(self) -> None: ...

    async def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in signature order for one (possibly batched) set of inputs."""
        ...

    async def unload(self) -> None: ...


def _providers(preferred: list[str]) -> list[str]:
    available = set(ort.get_available_providers())
    chosen = [p for p in preferred if p in available]
    return chosen or ["CPUExecutionProvider"]


class OrtRuntime:
    """`instances` ONNX Runtime sessions, each used by one worker thread at a time."""

    def __init__(self, folder: Path, manifest: Manifest, settings: ServeSpec) -> None:
        self.folder = folder
        self.manifest = manifest
        self.settings = settings
        # What infer() takes: strings for text models (tokenized here), the graph's tensors otherwise
        # (a language model's generator feeds the graph itself).
        self.signature = manifest.signature if manifest.generation is not None else manifest.served_signature
        self._text: TextEncoder | None = None  # text models: tokenized on the worker thread, after batching
        self.providers: list[str] = []
        self._sessions: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        self._executor: ThreadPoolExecutor | None = None

    def _create_sessions(self) -> None:
        verify_artifact(self.folder)  # refuse tampered files before any of them is parsed
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.settings.intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        providers = _providers(self.settings.execution_providers)
        self._text = artifact_encoder(self.folder, self.manifest)
        source = model_source(self.folder, self.manifest)  # a path, or decrypted bytes kept in memory only
        for _ in range(self.settings.instances):
            try:
                session = ort.InferenceSession(source, options, providers=providers)
            except Exception as exc:  # onnxruntime's exception classes are not importable by name
                raise ModelLoadError(f"{self.manifest.name}:{self.manifest.version}: cannot load: {exc}") from None
            self._sessions.put(session)
        self.providers = session.get_providers()

    async def load(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=self.settings.instances, thread_name_prefix=f"ort-{self.manifest.name}"
        )
        await asyncio.get_running_loop().run_in_executor(self._executor, self._create_sessions)

    def run_sync(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run on the calling thread (worker threads, or the event loop for models fast enough)."""
        if self._text is not None:
            feeds = self._text.apply(feeds)
        session = self._sessions.get()
        try:
            return session.run(None, feeds)  # type: ignore[no-any-return]
        finally:
            self._sessions.put(session)

    async def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._executor is None:
            raise ModelLoadError(f"{self.manifest.name}:{self.manifest.version} is not loaded")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.run_sync, feeds)

    async def warm_up(self, batch_sizes: list[int]) -> float:
        """Run every batch size in use on every instance, so no first request at a new size stalls.

        Returns the slowest batch's compute time in seconds, timed after its warm-up run.
        """
        slowest = 0.0
        for size in batch_sizes:
            feeds = random_feeds(self.signature, batch=size, seed=size)
            await asyncio.gather(*(self.infer(feeds) for _ in range(self.settings.instances)))
            start = time.perf_counter()
            await asyncio.get_running_loop().run_in_executor(self._executor, self.run_sync, feeds)
            slowest = max(slowest, time.perf_counter() - start)
        return slowest

    async def unload(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        while not self._sessions.empty():
            self._sessions.get()
