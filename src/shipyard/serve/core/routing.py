"""Which loaded version answers a request: the one it names, or the one the rollout rules pick."""

from __future__ import annotations

from shipyard.errors import NotFoundError
from shipyard.serve.core.loaded import LoadedModel
from shipyard.serve.core.repository import ModelRepository
from shipyard.serve.policy.rollout import Rollout


def answering(
    repository: ModelRepository, rollout: Rollout, name: str, version: str | None, *, draw: bool = False
) -> LoadedModel:
    """A named version, or the primary (with `draw`, a canary by its weight); shadows never answer a versionless
    request, for inference, generation and metadata alike."""
    if version or not rollout.governs(name):
        return repository.get(name, version)
    loaded = repository.versions(name)
    chosen = rollout.route(name, loaded) if draw else rollout.primary(name, loaded)
    if chosen is None:
        if not loaded:
            return repository.get(name)  # the repository's own "not loaded" error
        raise NotFoundError(f"model {name!r}: only shadow versions are loaded, so none may answer; "
                            "name a version to query a shadow directly")  # fmt: skip
    return repository.get(name, str(chosen))
