"""One server, one or many worker processes: the operations that must see or change every worker's state.

A worker owns its models, batchers and counters. What the protocol reports for the whole server (readiness,
statistics, drift, feedback) and what must change everywhere before it is acknowledged (loading, unloading) is
an operation on one worker's own state (LocalOps) run on every worker through a Cluster; serverwide.py combines
the answers. `Alone` is the cluster of a single process; serve/fleet/link.py reaches the other workers of
`shipyard serve --workers N` through their supervisor.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from shipyard.errors import ErrorKind, ShipyardError
from shipyard.serve.core.dataplane import DataPlane
from shipyard.serve.core.management import Management
from shipyard.serve.observe.metrics import ServerMetrics, Snapshot
from shipyard.serve.observe.quality import QualityMonitor

logger = logging.getLogger(__name__)
Outcome = tuple[bool, Any]  # (True, value) or (False, packed error): what crosses a process boundary


@dataclass(frozen=True)
class Replies:
    """Every worker's answer to one operation, in worker order."""

    values: list[Any]
    missing: int = 0  # workers that could not answer: starting, or replaced during the call


class Cluster(Protocol):
    async def each(self, op: str, *args: Any) -> Replies:
        """Run LocalOps `op` on every worker; the first error any worker raised is raised here."""
        ...


def pack(exc: ShipyardError) -> tuple[str, str, str | None, str | None]:
    return str(exc), exc.kind.value, exc.param, exc.code


def unpack(packed: tuple[str, str, str | None, str | None]) -> ShipyardError:
    message, kind, param, code = packed
    return ShipyardError(message, kind=ErrorKind(kind), param=param, code=code)


class LocalOps:
    """The operations one worker does on its own state, by name (what a Cluster runs on each worker)."""

    def __init__(
        self, dataplane: DataPlane, management: Management, quality: QualityMonitor, metrics: ServerMetrics,
        worker: int = 0,
    ) -> None:  # fmt: skip

        async def ready() -> bool:
            return dataplane.ready()

        async def model_ready(name: str, version: str | None) -> bool:
            return dataplane.model_ready(name, version)

        async def statistics(name: str | None, version: str | None) -> Any:
            return dataplane.model_statistics(name, version)

        async def loaded() -> list[str]:
            return [f"{h.name}:{h.version}" for h in management.repository.handles()]

        async def drift(name: str, version: str | None) -> Any:
            return quality.drift_counts(name, version)

        async def score(name: str, version: str | None, items: list[dict[str, Any]]) -> Any:
            return worker, quality.score(name, version, items)

        async def record(name: str, scores: list[tuple[int, int, str, float]]) -> Any:
            return quality.record(name, [s[1:] for s in scores if s[0] == worker])

        async def observe() -> Snapshot:
            return metrics.snapshot()

        self._table: dict[str, Callable[..., Awaitable[Any]]] = {
            "ready": ready, "model_ready": model_ready, "statistics": statistics, "loaded": loaded,
            "load": management.load, "unload": management.unload, "drift": drift, "score": score,
            "record": record, "observe": observe,
        }  # fmt: skip

    async def call(self, op: str, args: tuple[Any, ...]) -> Any:
        return await self._table[op](*args)

    async def run(self, op: str, args: tuple[Any, ...]) -> Outcome:
        """The operation's value, or its error packed: the asking worker is always answered."""
        try:
            return True, await self.call(op, args)
        except ShipyardError as exc:
            return False, pack(exc)
        except Exception:
            logger.exception("server-wide operation %s failed on this worker", op)
            return False, pack(ShipyardError("internal error (see the server log)"))


class Alone:
    """The cluster of a server that is one process."""

    def __init__(self, ops: LocalOps) -> None:
        self.ops = ops

    async def each(self, op: str, *args: Any) -> Replies:
        return Replies([await self.ops.call(op, args)])
