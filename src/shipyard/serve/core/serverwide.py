"""What the transports report and change for the whole server, however many worker processes it has.

Each operation runs on every worker through the cluster (cluster.py) and the answers are combined here:
readiness is every worker's, statistics and drift windows are added up, a repository change is acknowledged
once every worker has made it, and a posted label is scored by whichever worker remembers its request.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

from shipyard.errors import InvalidInputError, NotFoundError, UnavailableError
from shipyard.serve.core.cluster import Cluster, Drift, Load, ModelReady, Ready, Record, Score, Statistics, Unload
from shipyard.serve.observe.drift import report_of
from shipyard.serve.observe.feedback import OnlineMetric
from shipyard.serve.observe.metrics import add_by_key
from shipyard.serve.observe.quality import QualityMonitor
from shipyard.serve.protocol.types import ModelStatistics


class ServerWide:
    def __init__(self, cluster: Cluster, quality: QualityMonitor) -> None:
        self.cluster = cluster
        self.quality = quality  # this worker's: the references drift is measured against

    async def ready(self) -> bool:
        replies = await self.cluster.each(Ready())
        return replies.missing == 0 and all(replies.values)

    async def model_ready(self, name: str, version: str | None) -> bool:
        replies = await self.cluster.each(ModelReady(name, version))
        return replies.missing == 0 and all(replies.values)

    async def statistics(self, name: str | None, version: str | None) -> list[ModelStatistics]:
        """Every worker's counters of each version, added up (perf_analyzer reads these)."""
        replies = await self.cluster.each(Statistics(name, version))
        per_worker = ({(s.name, s.version): s for s in stats} for stats in replies.values)
        total: dict[tuple[str, str], ModelStatistics] = functools.reduce(add_by_key, per_worker, {})
        return [total[key] for key in sorted(total, key=lambda k: (k[0], int(k[1])))]

    async def load(self, name: str, parameters: dict[str, Any]) -> None:
        await self._every_worker_up("load")
        await self.cluster.each(Load(name, parameters))

    async def unload(self, name: str, parameters: dict[str, Any]) -> None:
        await self._every_worker_up("unload")
        await self.cluster.each(Unload(name, parameters))

    async def _every_worker_up(self, what: str) -> None:
        # A worker being replaced would miss the change: refuse it before any worker makes it.
        if (await self.cluster.each(Ready())).missing:
            raise UnavailableError(f"cannot {what} now: a worker is restarting; retry in a few seconds")

    async def drift(self, name: str, version: str | None) -> dict[str, Any]:
        """Input and prediction PSI against the build's reference, over every worker's window."""
        replies = await self.cluster.each(Drift(name, version))
        answered = replies.values[0][0]
        counts = functools.reduce(operator.add, (c for _, c in replies.values))
        drift = self.quality.drift_monitor(name, str(answered))[1]  # the workers just reported its window
        return {"name": name, "version": str(answered), **report_of(drift.reference, counts)}

    async def feedback(self, name: str, version: str | None, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Score posted labels ({"id", "label"}) against the predictions remembered for those request ids, each
        by the worker and version that answered it (under a canary, a versionless call spans versions). Every
        label is scored before any is counted: a bad item leaves every online metric unchanged."""
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("id"), str) or "label" not in item:
                raise InvalidInputError('feedback items are {"id": "<request id>", "label": <value>}')
        if len({item["id"] for item in items}) != len(items):
            raise InvalidInputError("each request id may appear once per feedback call")
        scored = await self.cluster.each(Score(name, version, items))
        owners: list[tuple[int, int, str, float]] = []  # (worker, version, request id, score)
        for i, item in enumerate(items):
            found = next(((w, pair) for w, s in scored.values if (pair := s[i]) is not None), None)
            if found is None:
                raise NotFoundError(f"no remembered prediction for request id {item['id']!r} (unknown or too old)")
            worker, (owner, score) = found
            owners.append((worker, owner, item["id"], score))
        recorded = await self.cluster.each(Record(name, owners))
        online: dict[int, OnlineMetric] = functools.reduce(add_by_key, recorded.values, {})
        versions = [
            {"version": str(v), "scored": sum(o[1] == v for o in owners), "online": online[v].value,
             "count": online[v].count, "build": online[v].built}
            for v in sorted({o[1] for o in owners})
        ]  # fmt: skip
        return {"name": name, "metric": next(iter(online.values())).metric, "scored": len(owners), "versions": versions}
