"""The Ray Serve application: every replica runs shipyard's runtime behind the Open Inference Protocol REST routes.

`serve run` / `serve deploy` load it from the rendered ray/serve_config.yaml
(`import_path: shipyard.deploy.ray_app:build_app`); the same `args` work with `serve.run(build_app(args))`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from shipyard.registry import open_registry
from shipyard.registry import remote as remote_storage
from shipyard.serve.dataplane import DataPlane
from shipyard.serve.metrics import ServerMetrics
from shipyard.serve.repository import ModelRepository
from shipyard.serve.rest import RestApp

MAX_BODY_BYTES = 64 << 20


class ShipyardReplica:
    """One replica: loads and warms the models, then answers through shipyard's own ASGI app."""

    # Ray Serve awaits an async constructor; the models load and warm up before the replica takes traffic.
    async def __init__(self, models: list[str], registry: str | None, pull: list[str]) -> None:  # type: ignore[misc]
        if pull:  # archives from object storage into a registry of this replica's own (any node works)
            self._scratch = tempfile.TemporaryDirectory(prefix="shipyard-ray-")
            registry = self._scratch.name
        local = open_registry(Path(registry) if registry else None)
        pulled = [remote_storage.pull(local, uri) for uri in pull]
        refs = [f"{m.name}:{m.version}" for m in pulled] if pulled else models
        self.repository = ModelRepository(local, ServerMetrics())
        self.dataplane = DataPlane(self.repository)
        await self.repository.load_all(refs)
        self.dataplane.loading_done = True

    def __serve_build_asgi_app__(self) -> RestApp:
        return RestApp(self.dataplane, MAX_BODY_BYTES)


SHIPYARD_DEPLOYMENT = serve.deployment(name="shipyard")(serve.ingress()(ShipyardReplica))


def build_app(args: dict[str, Any]) -> Application:
    """The application for `args` (models, registry, pull, num_cpus, autoscaling) from the rendered config."""
    deployment = SHIPYARD_DEPLOYMENT.options(
        autoscaling_config=args["autoscaling"],
        ray_actor_options={"num_cpus": float(args["num_cpus"])},
    )
    app: Application = deployment.bind(list(args["models"]), args.get("registry"), list(args.get("pull", [])))
    return app
