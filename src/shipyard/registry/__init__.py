"""The model registry: versions, aliases, atomic publishing, push/pull by URI."""

from __future__ import annotations

from pathlib import Path

from shipyard.errors import InvalidInputError
from shipyard.registry.local import LocalRegistry, VersionRecord
from shipyard.registry.refs import ModelRef, parse_ref
from shipyard.settings import DEFAULT_REGISTRY


def open_registry(location: str | Path | None = None) -> LocalRegistry:
    """The registry at `location` (a path or file:// URI), else ~/.shipyard/registry."""
    where = str(location or DEFAULT_REGISTRY)
    if where.startswith("file://"):
        where = where[len("file://") :]
    elif "://" in where:
        raise InvalidInputError(
            f"registry {where!r}: the registry index lives on a local path; "
            "use `shipyard push`/`pull` to move versions to and from object storage"
        )
    return LocalRegistry(Path(where))


__all__ = ["LocalRegistry", "ModelRef", "VersionRecord", "open_registry", "parse_ref"]
