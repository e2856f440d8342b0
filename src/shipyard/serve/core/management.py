"""The repository extension: the index of registered versions, and loading / unloading them at run time."""

from __future__ import annotations

from typing import Any

from shipyard.errors import InvalidInputError
from shipyard.serve.core.repository import ModelRepository
from shipyard.serve.protocol.numbers import parse_count
from shipyard.serve.protocol.types import RepositoryEntry


def _version_parameter(parameters: dict[str, Any]) -> int | None:
    version = parameters.get("version")
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, int | str):
        raise InvalidInputError(f"parameter 'version' must be a number, got {version!r}")
    return parse_count(str(version), "parameter 'version'")


class Management:
    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def index(self) -> list[RepositoryEntry]:
        return self.repository.index()

    async def load(self, name: str, parameters: dict[str, Any]) -> None:
        """Load the newest registered version, or the one named by parameter `version`."""
        version = _version_parameter(parameters)
        await self.repository.load(name if version is None else f"{name}:{version}")

    async def unload(self, name: str, parameters: dict[str, Any]) -> None:
        """Unload every loaded version, or only parameter `version`; queued requests finish first."""
        await self.repository.unload(name, _version_parameter(parameters))
