"""The composition root: settings in, every serving component built and wired once.

`shipyard serve` (serve/server.py) and a Ray Serve replica (deploy/ray_app.py) both build their server
here, so the request timeout, size limits, access control and rollouts are the same wherever it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shipyard.registry import LocalRegistry
from shipyard.serve.core.cluster import Alone, Cluster, LocalOps
from shipyard.serve.core.dataplane import DataPlane
from shipyard.serve.core.generation import TextGeneration
from shipyard.serve.core.management import Management
from shipyard.serve.core.repository import ModelRepository
from shipyard.serve.core.serverwide import ServerWide
from shipyard.serve.core.services import Services
from shipyard.serve.observe.hooks import AfterAnswer
from shipyard.serve.observe.metrics import ServerMetrics
from shipyard.serve.observe.quality import QualityMonitor
from shipyard.serve.observe.request_log import RequestLog
from shipyard.serve.policy.auth import AccessControl, TokenFileWatch
from shipyard.serve.policy.rate_limit import Buckets, RateLimiter
from shipyard.serve.policy.rollout import Rollout
from shipyard.serve.settings import ServeSettings
from shipyard.serve.transports.http import HttpApp
from shipyard.serve.transports.openai import OPENAI
from shipyard.serve.transports.v2 import V2


@dataclass(frozen=True)
class Server:
    """A server's parts, ready to be given listeners (or a Ray ingress)."""

    settings: ServeSettings
    metrics: ServerMetrics
    repository: ModelRepository
    services: Services
    access: AccessControl
    rest: HttpApp  # the V2 and OpenAI route sets on one port
    request_log: RequestLog | None = None


def compose(
    settings: ServeSettings, registry: LocalRegistry, join: Callable[[LocalOps], Cluster] = Alone,
    buckets: Buckets | None = None, worker: int = 0,
) -> Server:  # fmt: skip
    """Build every component from the settings; nothing is loaded or listening yet. A worker of a server with
    several passes its index, how it `join`s the others (serve/fleet/link.py) and the shared rate buckets."""
    metrics = ServerMetrics()
    repository = ModelRepository(registry, metrics, settings.trusted_key, settings.encryption_key,
                                 settings.memory_limit_bytes, settings.workers, settings.tensorrt_cache)  # fmt: skip
    rollout = Rollout(canary=settings.canary, shadow=settings.shadow, counts=metrics.shadow)
    request_log = None
    if settings.log_dir is not None:
        file_name = f"requests-{worker}.jsonl" if settings.workers > 1 else "requests.jsonl"  # one file per process
        request_log = RequestLog(settings.log_dir, settings.log_sample, settings.log_max_bytes,
                                 redact=settings.log_redact, file_name=file_name)  # fmt: skip
    generation = TextGeneration(repository, rollout, settings.request_timeout_s, settings.max_elements)
    dataplane = DataPlane(
        repository, generation, rollout=rollout,
        after_answer=AfterAnswer(repository, rollout, settings.drift_sample, request_log),
        timeout_s=settings.request_timeout_s, max_elements=settings.max_elements,
    )  # fmt: skip
    management, quality = Management(repository), QualityMonitor(repository)
    cluster = join(LocalOps(dataplane, management, quality, metrics, worker))
    services = Services(dataplane, generation, management, ServerWide(cluster, quality))
    access = AccessControl(
        tokens=TokenFileWatch(settings.tokens_file) if settings.tokens_file is not None else None,
        allow_management=settings.allow_management,
        limiter=RateLimiter(settings.rate_limit, settings.rate_burst, buckets) if settings.rate_limit else None,
        open_health=settings.open_health,
    )
    rest = HttpApp(services, access, [V2, OPENAI], settings.max_body_bytes, settings.body_timeout_s)
    return Server(settings, metrics, repository, services, access, rest, request_log)
