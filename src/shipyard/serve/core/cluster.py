"""One server, one or many worker processes: the operations that must see or change every worker's state.

A worker owns its models, batchers and counters. What the protocol reports for the whole server (readiness,
statistics, drift, feedback) and what must change everywhere before it is acknowledged (loading, unloading) is
an operation on one worker's own state (LocalOps) run on every worker through a Cluster; serverwide.py combines
the answers. `Alone` is the cluster of a single process; serve/fleet/link.py reaches the other workers of
`shipyard serve --workers N` through their supervisor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from shipyard.errors import ErrorKind, ShipyardError
from shipyard.serve.core.dataplane import DataPlane
from shipyard.serve.core.management import Management
from shipyard.serve.observe.drift import DriftCounts
from shipyard.serve.observe.feedback import OnlineMetric
from shipyard.serve.observe.metrics import ServerMetrics, Snapshot
from shipyard.serve.observe.quality import QualityMonitor
from shipyard.serve.protocol.types import ModelStatistics

logger = logging.getLogger(__name__)
Outcome = tuple[bool, Any]  # (True, value) or (False, packed error): what crosses a process boundary
T = TypeVar("T")


@dataclass(frozen=True)
class Replies(Generic[T]):
    """Every worker's answer to one operation, in worker order."""

    values: list[T]
    missing: int = 0  # workers that could not answer: starting, or replaced during the call


class LocalOps:
    """One worker's own state, which operations read and change."""

    def __init__(
        self, dataplane: DataPlane, management: Management, quality: QualityMonitor, metrics: ServerMetrics,
        worker: int = 0,
    ) -> None:  # fmt: skip
        self.dataplane, self.management, self.quality, self.metrics = dataplane, management, quality, metrics
        self.worker = worker

    async def run(self, op: Operation[Any]) -> Outcome:
        """The operation's value, or its error packed: the asking worker is always answered."""
        try:
            return True, await op.on(self)
        except ShipyardError as exc:
            return False, pack(exc)
        except Exception:
            logger.exception("server-wide operation %s failed on this worker", type(op).__name__)
            return False, pack(ShipyardError("internal error (see the server log)"))


class Operation(Generic[T]):
    """A server-wide operation: a frozen dataclass (it crosses process boundaries as a pickle) whose `on` does
    it on one worker's state and returns that worker's answer, of type T."""

    async def on(self, ops: LocalOps) -> T:
        raise NotImplementedError


@dataclass(frozen=True)
class Ready(Operation[bool]):
    async def on(self, ops: LocalOps) -> bool:
        return ops.dataplane.ready()


@dataclass(frozen=True)
class ModelReady(Operation[bool]):
    name: str
    version: str | None

    async def on(self, ops: LocalOps) -> bool:
        return ops.dataplane.model_ready(self.name, self.version)


@dataclass(frozen=True)
class Statistics(Operation[list[ModelStatistics]]):
    name: str | None
    version: str | None

    async def on(self, ops: LocalOps) -> list[ModelStatistics]:
        return ops.dataplane.model_statistics(self.name, self.version)


@dataclass(frozen=True)
class Loaded(Operation[list[str]]):
    """The versions this worker serves, as references (what a replacement worker loads)."""

    async def on(self, ops: LocalOps) -> list[str]:
        return [f"{h.name}:{h.version}" for h in ops.management.repository.handles()]


@dataclass(frozen=True)
class Load(Operation[None]):
    name: str
    parameters: dict[str, Any]

    async def on(self, ops: LocalOps) -> None:
        await ops.management.load(self.name, self.parameters)


@dataclass(frozen=True)
class Unload(Operation[None]):
    name: str
    parameters: dict[str, Any]

    async def on(self, ops: LocalOps) -> None:
        await ops.management.unload(self.name, self.parameters)


@dataclass(frozen=True)
class Drift(Operation[tuple[int, DriftCounts]]):
    """The answering version and its drift window's bin counts."""

    name: str
    version: str | None

    async def on(self, ops: LocalOps) -> tuple[int, DriftCounts]:
        return ops.quality.drift_counts(self.name, self.version)


@dataclass(frozen=True)
class Score(Operation[tuple[int, list[tuple[int, float] | None]]]):
    """This worker's index, and for each label (version, score) where a version here answered its request."""

    name: str
    version: str | None
    items: list[dict[str, Any]]

    async def on(self, ops: LocalOps) -> tuple[int, list[tuple[int, float] | None]]:
        return ops.worker, ops.quality.score(self.name, self.version, self.items)


@dataclass(frozen=True)
class Record(Operation[dict[int, OnlineMetric]]):
    """Count scored labels, each on the worker that scored it: (worker, version, request id, score)."""

    name: str
    scores: list[tuple[int, int, str, float]]

    async def on(self, ops: LocalOps) -> dict[int, OnlineMetric]:
        return ops.quality.record(self.name, [s[1:] for s in self.scores if s[0] == ops.worker])


@dataclass(frozen=True)
class Observe(Operation[Snapshot]):
    """This worker's metrics, for a scrape of the whole server."""

    async def on(self, ops: LocalOps) -> Snapshot:
        return ops.metrics.snapshot()


class Cluster(Protocol):
    async def each(self, op: Operation[T]) -> Replies[T]:
        """Run `op` on every worker; the first error any worker raised is raised here."""
        ...


def pack(exc: ShipyardError) -> tuple[str, str, str | None, str | None]:
    return str(exc), exc.kind.value, exc.param, exc.code


def unpack(packed: tuple[str, str, str | None, str | None]) -> ShipyardError:
    message, kind, param, code = packed
    return ShipyardError(message, kind=ErrorKind(kind), param=param, code=code)


class Alone:
    """The cluster of a server that is one process."""

    def __init__(self, ops: LocalOps) -> None:
        self.ops = ops

    async def each(self, op: Operation[T]) -> Replies[T]:
        return Replies([await op.on(self.ops)])
