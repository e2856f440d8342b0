"""Run the build steps in order, record lineage, and publish the artifact atomically."""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from shipyard.artifact.encryption import ALGORITHM, key_id, seal
from shipyard.artifact.hashing import sha256_file
from shipyard.artifact.layout import create_manifest
from shipyard.artifact.manifest import LineageStep, Manifest
from shipyard.onnxrt import model_files
from shipyard.pipeline.context import BuildContext
from shipyard.pipeline.family import build_steps
from shipyard.pipeline.step import NullProgress, Progress
from shipyard.registry.local import LocalRegistry
from shipyard.spec.loader import LoadedSpec, parse_spec


class Reporter(Protocol):
    """Receives step boundaries; the CLI draws progress bars from them."""

    def step(self, description: str) -> AbstractContextManager[Progress]: ...


class NullReporter:
    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[Progress]:
        yield NullProgress()


class _ModelHashes:
    """The lineage's hash of the model a step left: the model file's sha256, or with a side file of weights a
    sha256 over both files' names and digests. A file is hashed once per change (its size and modification
    time are the key), not before and after every step."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int], str] = {}

    def _file(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._known:
            self._known[key] = sha256_file(path)
        return self._known[key]

    def of(self, ctx: BuildContext) -> str | None:
        if ctx.model_path is None:
            return ctx.source_sha256
        digests = [(f.name, self._file(f)) for f in model_files(ctx.model_path)]
        if len(digests) == 1:
            return digests[0][1]
        return hashlib.sha256(json.dumps(digests).encode()).hexdigest()


def build(
    loaded: LoadedSpec,
    registry: LocalRegistry,
    reporter: Reporter | None = None,
    *,
    encryption_key: bytes | None = None,
) -> Manifest:
    """Load, convert, verify and evaluate the spec's model, then publish it as the next version (its model file
    sealed with `encryption_key` when one is given).

    Returns the published manifest. Any failure raises before publishing, and the staging
    folder is removed, so nothing partial ever appears in the registry.
    """
    spec = loaded.spec
    reporter = reporter or NullReporter()
    with registry.stage() as staged, tempfile.TemporaryDirectory(prefix="shipyard-") as scratch:
        ctx = BuildContext(loaded=loaded, artifact_dir=staged, scratch_dir=Path(scratch))
        hashes = _ModelHashes()
        for step in build_steps(spec):
            before = hashes.of(ctx)
            start = time.perf_counter()
            with reporter.step(step.description) as progress:
                params = step.run(ctx, progress)
            after = hashes.of(ctx)
            ctx.lineage.append(
                LineageStep(
                    step=step.name,
                    params=params,
                    input_sha256=before,
                    output_sha256=after if after != before else None,
                    seconds=round(time.perf_counter() - start, 3),
                )
            )
        model_path, signature = ctx.require_model()
        key = encryption_key
        sealed: dict[str, str] | None = None
        if key is not None:  # sealed last: every step above worked on the plain model
            files = model_files(model_path)
            for file in files:
                seal(file, key)
            sealed = {"algorithm": ALGORITHM, "key_id": key_id(key)}
            if len(files) > 1:  # the weights live beside the graph (models over 2 GB)
                sealed["side_file"] = files[1].relative_to(staged).as_posix()
        create_manifest(
            staged,
            name=spec.name,
            model_file=model_path.relative_to(staged).as_posix(),
            signature=signature,
            description=spec.description,
            metrics=ctx.metrics,
            lineage=ctx.lineage,
            spec=spec.model_dump(mode="json"),
            encryption=sealed,
            tokenizer=None if ctx.text is None else ctx.text.record,
            generation=ctx.generation,
        )
        return registry.publish(staged)


def import_onnx(
    path: Path,
    name: str,
    registry: LocalRegistry,
    reporter: Reporter | None = None,
    *,
    encryption_key: bytes | None = None,
) -> Manifest:
    """Register an ONNX file as it is: its signature read from the graph, timed, verified, published."""
    path = path.expanduser().resolve()
    spec = parse_spec({"name": name, "model": {"format": "onnx", "path": str(path)}}, source="shipyard import")
    return build(LoadedSpec(spec=spec, path=path.parent / "shipyard.yaml"), registry, reporter,
                 encryption_key=encryption_key)  # fmt: skip
