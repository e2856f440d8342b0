"""Loaded models: many names and versions, hot load/unload, and readiness."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

from shipyard import memory
from shipyard.artifact.manifest import Manifest
from shipyard.artifact.signing import verify_signature
from shipyard.errors import ErrorKind, ModelLoadError, NotFoundError, ShipyardError, UnavailableError
from shipyard.registry import LocalRegistry, VersionRecord
from shipyard.registry.refs import ModelRef, parse_ref
from shipyard.serve.core.loaded import LoadedModel, TensorModel, open_model
from shipyard.serve.core.runtime import OrtRuntime
from shipyard.serve.observe.metrics import ServerMetrics
from shipyard.serve.observe.stats import ModelStats
from shipyard.serve.protocol.numbers import parse_count
from shipyard.serve.protocol.types import RepositoryEntry
from shipyard.spec.models import ServeSpec

logger = logging.getLogger(__name__)
# ONNX Runtime's messages name its own source files: "/onnxruntime_src/onnxruntime/core/graph/model.cc:180 ..."
_SOURCE_LOCATION = re.compile(r"\S*onnxruntime_src\S*:\d+ ?(\S+\(.*?\) )?")


def serve_settings(manifest: Manifest) -> ServeSpec:
    """The serve section the model was built with (defaults for imported models)."""
    section = (manifest.spec or {}).get("serve")
    return ServeSpec.model_validate(section) if section else ServeSpec()


class ModelRepository:
    """Models by name and version; requests without a version get the newest loaded one."""

    def __init__(
        self, registry: LocalRegistry, metrics: ServerMetrics, trusted_key: Path | None = None,
        encryption_key: bytes | None = None, memory_limit_bytes: int | None = None, workers: int = 1,
        tensorrt_cache: Path | None = None,
    ) -> None:  # fmt: skip
        self.registry = registry
        self.metrics = metrics
        self.trusted_key = trusted_key  # when set, only versions signed with its private half are served
        self.encryption_key = encryption_key  # opens sealed model files
        self.memory_limit_bytes = memory_limit_bytes  # a configured budget; else what the machine has free
        self.workers = workers  # processes of this server sharing the cores (and the budget)
        self.tensorrt_cache = tensorrt_cache  # engines built by the TensorRT provider, one folder per artifact
        self._models: dict[str, dict[int, LoadedModel]] = {}
        self._lock = asyncio.Lock()  # serializes load/unload; inference never takes it
        self._failed: dict[tuple[str, int], str] = {}  # versions that failed to load -> why (for the index)

    async def load(self, ref: str | ModelRef) -> LoadedModel:
        """Load (or return the already loaded) version a registry reference names; ready when this returns."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        async with self._lock:
            record = self.registry.resolve(parsed)
            existing = self._models.get(record.name, {}).get(record.version)
            if existing is not None:
                return existing
            try:
                handle = await self._open(record)
            except ShipyardError as exc:
                reason = self._public(str(exc))
                self._failed[(record.name, record.version)] = reason
                if exc.kind in (ErrorKind.CORRUPT, ErrorKind.INTERNAL, ErrorKind.MISSING_DEPENDENCY):
                    # The stored version, not the caller, is at fault; the caller hears why (a 400, as
                    # Triton answers a failed load), never a 500 or where the registry is.
                    raise ModelLoadError(f"{record.name}:{record.version} cannot be loaded: {reason}") from None
                raise
            if isinstance(handle, TensorModel) and handle.drift is not None:
                self.metrics.drift[(record.name, record.version)] = handle.drift
            if isinstance(handle, TensorModel) and handle.feedback is not None:
                self.metrics.feedback[(record.name, record.version)] = handle.feedback.online
            self._models.setdefault(record.name, {})[record.version] = handle
            self._failed.pop((record.name, record.version), None)
            return handle

    def _public(self, message: str) -> str:
        """A load error as clients may read it: without the registry's location on disk or ONNX Runtime's
        source locations."""
        message = message.replace(f"{self.registry.root}/", "").replace(str(self.registry.root), "the registry")
        return _SOURCE_LOCATION.sub("", message)

    async def _open(self, record: VersionRecord) -> LoadedModel:
        """Verify, load and warm up one version: ready for requests when this returns."""
        folder = self.registry.path(record)
        manifest = self.registry.manifest(record)
        if self.trusted_key is not None:  # hashes every file: off the event loop
            await asyncio.to_thread(verify_signature, folder, self.trusted_key)
        settings = serve_settings(manifest)
        self._check_memory(folder, manifest, settings)
        runtime = OrtRuntime(folder, manifest, settings, self.encryption_key, self.workers, self.tensorrt_cache)
        stats = ModelStats.of(record.name, record.version, self.metrics)
        try:  # a version that fails here leaves no sessions, threads or metric series behind
            model = open_model(record.version, folder, manifest, settings, runtime, stats)
            await model.start()
        except BaseException:
            stats.forget()
            raise
        return model

    def _check_memory(self, folder: Path, manifest: Manifest, settings: ServeSpec) -> None:
        """Refuse a version that would not fit (memory.py's estimate against the budget or what is free):
        a clear error now rather than the process killed half-way through loading."""
        needed = memory.estimate(folder, manifest, settings.instances)
        # A budget is the whole server's: each worker process loads every model into its share of it.
        limit = self.memory_limit_bytes
        room = limit // self.workers if limit is not None else memory.available()
        if room is not None and needed > room:
            where = "free memory here" if limit is None else "the --memory-limit"
            if limit is not None and self.workers > 1:
                where = f"one worker's share (1/{self.workers}) of the --memory-limit"
            raise UnavailableError(
                f"{manifest.name}:{manifest.version} needs about {memory.mib(needed)} ("
                f"{memory.mib(memory.weight_bytes(folder, manifest))} of weights x {settings.instances} instance(s), "
                f"ONNX Runtime's working memory, {memory.mib(memory.cache_bytes(manifest))} of key/value cache), "
                f"more than {where} ({memory.mib(room)})"
            )

    def resolve(self, ref: str) -> VersionRecord:
        """The registered version a reference (NAME, NAME:VERSION, NAME@ALIAS) names; reads the registry."""
        return self.registry.resolve(parse_ref(ref))

    def resolve_all(self, refs: list[str]) -> list[VersionRecord]:
        """The registered version each reference names; NotFoundError for one that names nothing (a typo must
        stop a server at start, not leave it serving less than was asked)."""
        return [self.resolve(ref) for ref in refs]

    async def load_all(self, refs: list[str]) -> None:
        """Load each reference. A version that exists but cannot be served (unsigned, tampered, unreadable) is
        logged and reported in the index with its reason while the others serve; UnavailableError when none
        of them can be."""
        failures = []
        for ref, record in zip(refs, self.resolve_all(refs), strict=True):
            try:
                await self.load(record.ref)
            except ShipyardError as exc:
                failures.append(f"{ref}: {exc}")
                logger.error("could not load %s: %s", ref, exc)
        if refs and not self.handles():
            raise UnavailableError("no model version could be loaded: " + "; ".join(failures))

    async def unload(self, name: str, version: int | None = None) -> list[int]:
        """Stop routing new requests to the version(s), let queued ones finish, then free them."""
        async with self._lock:
            versions = self._models.get(name)
            if not versions or (version is not None and version not in versions):
                raise NotFoundError(f"model {name!r}{f' version {version}' if version else ''} is not loaded")
            targets = [version] if version is not None else sorted(versions)
            handles = [versions.pop(v) for v in targets]
            if not versions:
                del self._models[name]
        for handle in handles:
            self.metrics.drift.pop((handle.name, handle.version), None)
            self.metrics.feedback.pop((handle.name, handle.version), None)
            await handle.stop()
            handle.stats.forget()
        return targets

    async def unload_all(self) -> None:
        for name in list(self._models):
            await self.unload(name)

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The handle for a request; NotFoundError naming what is loaded otherwise."""
        versions = self._models.get(name)
        if not versions:
            raise NotFoundError(f"model {name!r} is not loaded")
        if not version:
            return versions[max(versions)]
        handle = versions.get(parse_count(version, "model version"))
        if handle is None:
            raise NotFoundError(f"model {name!r} has no loaded version {version} (loaded: {sorted(versions)})")
        return handle

    def handles(self) -> list[LoadedModel]:
        return [h for versions in self._models.values() for h in versions.values()]

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def index(self) -> list[RepositoryEntry]:
        """Every registered version, whether it is served, and why not when it failed to load."""
        entries = []
        for record in self.registry.all_versions():
            key = (record.name, record.version)
            served = record.version in self._models.get(record.name, {})
            reason = "" if served else self._failed.get(key, "not loaded: registered, but not being served")
            entries.append(RepositoryEntry(record.name, str(record.version), "READY" if served else "UNAVAILABLE",
                                           reason))  # fmt: skip
        return entries
