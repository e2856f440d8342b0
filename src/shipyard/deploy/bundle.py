"""What a target renders: text files (diffed by `plan`) and the models they pin."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from shipyard.registry.local import LocalRegistry, VersionRecord
from shipyard.registry.remote import archive_name, folder_uri
from shipyard.spec.loader import LoadedSpec

REGISTRY_IN_CONTAINER = "/var/lib/shipyard/registry"
ARCHIVES_IN_CONTAINER = "/opt/shipyard/archives"


@dataclass(frozen=True)
class PinnedModel:
    """A served version as a release pins it: by number and by content."""

    name: str
    version: int
    content_hash: str

    @classmethod
    def of(cls, record: VersionRecord) -> PinnedModel:
        return cls(record.name, record.version, record.content_hash)

    @property
    def archive(self) -> str:
        """File name of the version's archive (as `shipyard push` names it in a folder)."""
        return archive_name(self.name, self.version)


@dataclass
class Bundle:
    """A rendered target: relative path -> file text, plus the models it serves."""

    target: str
    models: list[PinnedModel]
    files: dict[str, str] = field(default_factory=dict)


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def gpus(loaded: LoadedSpec) -> int:
    """NVIDIA GPUs per replica: the resources' count, at least one when the model is served on a GPU."""
    count = loaded.spec.deploy.resources.gpu
    return max(count, 1) if loaded.spec.serve.device != "cpu" else count


def pin_models(loaded: LoadedSpec, registry: LocalRegistry) -> list[PinnedModel]:
    """Resolve `deploy.models` (default: the spec's model, latest version) to concrete versions."""
    refs = loaded.spec.deploy.models or [loaded.spec.name]
    return [PinnedModel.of(registry.resolve(ref)) for ref in refs]


def serve_args(loaded: LoadedSpec, models: list[PinnedModel]) -> list[str]:
    """Arguments after `shipyard serve` in a container: names, and the archives to pull at start if any.

    The container's registry holds only the pinned versions, so names are enough there (a pulled
    version keeps its number, and the release pins its content hash too).
    """
    args = [m.name for m in models]
    for uri in pull_uris(loaded, models):
        args += ["--pull", uri]
    return args


def pull_uris(loaded: LoadedSpec, models: list[PinnedModel]) -> list[str]:
    """The archive URIs a server pulls at start (none when the models are baked in)."""
    uri = loaded.spec.deploy.registry_uri
    return [] if uri is None else [f"{folder_uri(uri)}{m.archive}" for m in models]


def server_env(loaded: LoadedSpec, host: str) -> dict[str, str]:
    ports = loaded.spec.deploy.ports
    return {
        "SHIPYARD_HOST": host,
        "SHIPYARD_HTTP_PORT": str(ports.http),
        "SHIPYARD_GRPC_PORT": str(ports.grpc),
        "SHIPYARD_METRICS_PORT": str(ports.metrics),
        "SHIPYARD_WORKERS": str(loaded.spec.serve.workers),
    }


class _Dumper(yaml.SafeDumper):
    """Writes shared sub-objects out in full: `&id001` anchors are legal YAML but confuse readers and tools."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(*objects: dict[str, Any]) -> str:
    return yaml.dump_all(list(objects), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
