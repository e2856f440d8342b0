"""The settings layer: what Shipyard takes from the process environment, and the defaults every path shares.

Entry points (the CLI commands, a Ray replica, the capacity probe process) read `Environment.from_environ()`
once and pass the values down; no other module reads `os.environ`. The serving defaults live here so the
CLI flags, the spec's `deploy.ports`, the rendered targets and the server agree without copies.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shipyard.errors import InvalidInputError

REGISTRY_ENV = "SHIPYARD_REGISTRY"
KEY_ENV = "SHIPYARD_ENCRYPTION_KEY"
KEY_FILE_ENV = "SHIPYARD_ENCRYPTION_KEY_FILE"
DEBUG_ENV = "SHIPYARD_DEBUG"
SCHEMES_ENV = "SHIPYARD_STORAGE_SCHEMES"
TENSORRT_CACHE_ENV = "SHIPYARD_TENSORRT_CACHE"
DEFAULT_TENSORRT_CACHE = "~/.cache/shipyard/tensorrt"
DEFAULT_REGISTRY = "~/.shipyard/registry"
# Storage URIs reach only these fsspec protocols unless the user enables more ($SHIPYARD_STORAGE_SCHEMES):
# fsspec also speaks http, ftp, sftp, github, memory, … and a spec or container argument must not reach them.
DEFAULT_STORAGE_SCHEMES = frozenset({"file", "s3"})

HTTP_PORT = 8000
GRPC_PORT = 8001
METRICS_PORT = 8002
MAX_BODY_BYTES = 64 << 20
REQUEST_TIMEOUT_S = 60.0
BODY_TIMEOUT_S = 30.0  # a request body still arriving after this long is refused (408)
MAX_ELEMENTS = 1 << 26  # per input tensor


def decode_key(text: str, where: str) -> bytes:
    """A base64 key as bytes; InvalidInputError naming `where` when it is not 32 bytes of base64."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError(f"{where}: the encryption key must be base64") from None
    if len(key) != 32:
        raise InvalidInputError(f"{where}: the encryption key must be 32 bytes (AES-256), not {len(key)}")
    return key


@dataclass(frozen=True)
class Environment:
    """The environment variables Shipyard reads, as they were when an entry point started."""

    registry: str | None = None
    """$SHIPYARD_REGISTRY: the registry used when no --registry is given."""
    key_text: str | None = None
    """$SHIPYARD_ENCRYPTION_KEY: base64 of a 32-byte AES key."""
    key_file: Path | None = None
    """$SHIPYARD_ENCRYPTION_KEY_FILE: a file holding that base64 text."""
    debug: bool = False
    """$SHIPYARD_DEBUG: show tracebacks of internal errors."""
    storage_schemes: frozenset[str] = DEFAULT_STORAGE_SCHEMES
    """URI schemes push, pull, serve --pull, backup and restore may use: file and s3, plus $SHIPYARD_STORAGE_SCHEMES
    (comma-separated, e.g. `gcs,az`)."""
    tensorrt_cache: Path = Path(DEFAULT_TENSORRT_CACHE)
    """$SHIPYARD_TENSORRT_CACHE: where servers on TensorRT keep the engines they build, per artifact."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Environment:
        env = os.environ if environ is None else environ
        key_file = env.get(KEY_FILE_ENV)
        return cls(
            registry=env.get(REGISTRY_ENV) or None,
            key_text=env.get(KEY_ENV) or None,
            key_file=Path(key_file) if key_file else None,
            debug=bool(env.get(DEBUG_ENV)),
            storage_schemes=DEFAULT_STORAGE_SCHEMES
            | {s.strip().lower() for s in env.get(SCHEMES_ENV, "").split(",") if s.strip()},
            tensorrt_cache=Path(env.get(TENSORRT_CACHE_ENV) or DEFAULT_TENSORRT_CACHE).expanduser(),
        )

    def encryption_key(self) -> bytes | None:
        """The configured AES-256 key, or None when encryption is not configured; InvalidInputError if malformed."""
        if self.key_text:
            return decode_key(self.key_text, f"${KEY_ENV}")
        if self.key_file is not None:
            try:
                return decode_key(self.key_file.read_text(), str(self.key_file))
            except FileNotFoundError:
                raise InvalidInputError(f"${KEY_FILE_ENV} names {self.key_file}, which does not exist") from None
        return None


HUB_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def hub_offline() -> None:
    """Keep Hugging Face libraries off the network, in this process and the children it starts: a build
    reads local folders only."""
    os.environ.update(HUB_OFFLINE)


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment plus `extra`, for a child process (a supervised server)."""
    return {**os.environ, **extra}
