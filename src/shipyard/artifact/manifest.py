"""The artifact manifest: what a version is, where it came from and how it measured."""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shipyard import __version__
from shipyard.spec.models import NAME_PATTERN, SignatureSpec

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Record):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class LineageStep(_Record):
    """One pipeline step: what ran, with which parameters, on what, producing what."""

    step: str
    params: dict[str, Any] = Field(default_factory=dict)
    input_sha256: str | None = None
    output_sha256: str | None = None
    seconds: float = 0.0


class Manifest(_Record):
    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    version: int | None = None  # assigned by the registry when the version is published
    created_at: str
    description: str = ""
    format: str = "onnx"
    model_file: str
    signature: SignatureSpec
    files: list[FileEntry]
    content_hash: str
    metrics: dict[str, float] = Field(default_factory=dict)
    lineage: list[LineageStep] = Field(default_factory=list)
    environment: dict[str, str] = Field(default_factory=dict)
    spec: dict[str, Any] | None = None  # the build spec, for reproduction
    encryption: dict[str, str] | None = None  # {"algorithm", "key_id"} when the model file is sealed

    def file(self, path: str) -> FileEntry:
        return next(f for f in self.files if f.path == path)

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def environment() -> dict[str, str]:
    """Versions of what produced the artifact (absent packages are left out)."""
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "shipyard": __version__}
    for dist in ("onnx", "onnxruntime", "torch", "scikit-learn", "skl2onnx", "numpy"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return env
