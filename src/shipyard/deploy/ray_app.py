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
from shipyard.serve.app import compose
from shipyard.serve.settings import ServeSettings
from shipyard.serve.transports.http import HttpApp
from shipyard.settings import Environment


class ShipyardReplica:
    """One replica: the same server `shipyard serve` composes (limits, timeout, access control), loaded and warmed,
    answering through its REST app; Ray's proxy is the listener."""

    # Ray Serve awaits an async constructor; the models load and warm up before the replica takes traffic.
    async def __init__(self, models: list[str], registry: str | None, pull: list[str]) -> None:  # type: ignore[misc]
        if pull:  # archives from object storage into a registry of this replica's own (any node works)
            self._scratch = tempfile.TemporaryDirectory(prefix="shipyard-ray-")
            registry = self._scratch.name
        env = Environment.from_environ()  # this replica's process is an entry point of its own
        local = open_registry(Path(registry) if registry else env.registry)
        pulled = [remote_storage.pull(local, uri, env.storage_schemes) for uri in pull]
        refs = [f"{m.name}:{m.version}" for m in pulled] if pulled else models
        settings = ServeSettings(models=refs, encryption_key=env.encryption_key(), tensorrt_cache=env.tensorrt_cache)
        self.server = compose(settings, local)
        await self.server.repository.load_all(refs)
        self.server.services.dataplane.loading_done = True

    def __serve_build_asgi_app__(self) -> HttpApp:
        return self.server.rest


SHIPYARD_DEPLOYMENT = serve.deployment(name="shipyard")(serve.ingress()(ShipyardReplica))


def build_app(args: dict[str, Any]) -> Application:
    """The application for `args` (models, registry, pull, num_cpus, autoscaling) from the rendered config."""
    deployment = SHIPYARD_DEPLOYMENT.options(
        autoscaling_config=args["autoscaling"],
        ray_actor_options={"num_cpus": float(args["num_cpus"]), "num_gpus": float(args.get("num_gpus", 0))},
    )
    app: Application = deployment.bind(list(args["models"]), args.get("registry"), list(args.get("pull", [])))
    return app
