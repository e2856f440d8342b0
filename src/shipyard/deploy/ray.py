"""The Ray Serve target: a Serve config (import path + args) that scales shipyard replicas on a Ray cluster."""

from __future__ import annotations

from typing import Any

from shipyard.deploy.bundle import Bundle, gpus, pull_uris, to_yaml
from shipyard.registry.local import LocalRegistry
from shipyard.spec.loader import LoadedSpec
from shipyard.spec.models import quantity

CONFIG_FILE = "ray/serve_config.yaml"


def app_args(loaded: LoadedSpec, bundle: Bundle, registry: LocalRegistry) -> dict[str, Any]:
    deploy = loaded.spec.deploy
    pull = pull_uris(loaded, bundle.models)
    return {
        "models": [f"{m.name}:{m.version}" for m in bundle.models],
        # Without a registry URI every node reads this registry folder (one machine or a shared file system).
        "registry": None if pull else str(registry.root),
        "pull": pull,
        "num_cpus": quantity(deploy.resources.cpu),
        "num_gpus": gpus(loaded),
        "autoscaling": {
            "min_replicas": deploy.min_replicas,
            "max_replicas": deploy.max_replicas,
            "target_ongoing_requests": deploy.target_ongoing_requests,
        },
    }


def render(loaded: LoadedSpec, bundle: Bundle, registry: LocalRegistry) -> None:
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": loaded.spec.deploy.ports.http},
        "applications": [{
            "name": loaded.spec.name,
            "route_prefix": "/",
            "import_path": "shipyard.deploy.ray_app:build_app",
            "args": app_args(loaded, bundle, registry),
        }],
    }  # fmt: skip
    bundle.files[CONFIG_FILE] = (
        "# Run with: serve run ray/serve_config.yaml (or serve deploy it to a cluster)\n" + to_yaml(config)
    )
