"""The model-quality extensions: labels posted as feedback, and input / prediction drift."""

from __future__ import annotations

from typing import Any

from shipyard.errors import InvalidInputError, NotFoundError
from shipyard.serve.core.repository import ModelRepository


class QualityMonitor:
    """Feedback scoring and drift reports for loaded versions (REST extensions of the protocol)."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def feedback(self, name: str, version: str | None, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Score posted labels ({"id", "label"}) against remembered predictions."""
        handle = self.repository.get(name, version)
        if handle.feedback is None:
            raise NotFoundError(f"{name}:{handle.version} has no online metric (its build had no scorable evaluation)")
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("id"), str) or "label" not in item:
                raise InvalidInputError('feedback items are {"id": "<request id>", "label": <value>}')
        if len({item["id"] for item in items}) != len(items):
            raise InvalidInputError("each request id may appear once per feedback call")
        # Every label is scored before any is counted: a bad item leaves the online metric unchanged.
        scores = [handle.feedback.evaluate(item["id"], item["label"]) for item in items]
        for item, score in zip(items, scores, strict=True):
            handle.feedback.record(item["id"], score)
        online = handle.feedback.online
        return {"name": name, "version": str(handle.version), "metric": online.metric, "scored": len(scores),
                "online": online.value, "count": online.count, "build": online.built}  # fmt: skip

    def drift(self, name: str, version: str | None) -> dict[str, Any]:
        """Input and prediction PSI against the build's reference."""
        handle = self.repository.get(name, version)
        if handle.drift is None:
            raise NotFoundError(f"{name}:{handle.version} has no reference distributions (built without evaluation)")
        return {"name": name, "version": str(handle.version), **handle.drift.report()}
