"""The model-quality extensions: labels posted as feedback, and input / prediction drift."""

from __future__ import annotations

from typing import Any

from shipyard.errors import InvalidInputError, NotFoundError
from shipyard.serve.core.repository import ModelHandle, ModelRepository
from shipyard.serve.observe.feedback import FeedbackStore


def _store(handle: ModelHandle) -> FeedbackStore:
    assert handle.feedback is not None  # only scorable handles get here
    return handle.feedback


class QualityMonitor:
    """Feedback scoring and drift reports for loaded versions (REST extensions of the protocol)."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def feedback(self, name: str, version: str | None, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Score posted labels ({"id", "label"}) against the predictions remembered for those request ids, each
        by the version that answered it (under a canary, a versionless call spans versions)."""
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("id"), str) or "label" not in item:
                raise InvalidInputError('feedback items are {"id": "<request id>", "label": <value>}')
        if len({item["id"] for item in items}) != len(items):
            raise InvalidInputError("each request id may appear once per feedback call")
        if version:
            handles = [self.repository.get(name, version)]
        else:
            handles = [self.repository.get(name, str(v)) for v in self.repository.versions(name)] or [
                self.repository.get(name)  # the repository's own "not loaded" error
            ]
        scorable = [h for h in handles if h.feedback is not None]
        if not scorable:
            raise NotFoundError(f"{name}: no online metric (the build had no scorable evaluation)")
        owners = []
        for item in items:
            owner = next((h for h in scorable if _store(h).knows(item["id"])), None)
            if owner is None:
                raise NotFoundError(f"no remembered prediction for request id {item['id']!r} (unknown or too old)")
            owners.append(owner)
        # Every label is scored before any is counted: a bad item leaves every online metric unchanged.
        scores = [_store(h).evaluate(item["id"], item["label"]) for h, item in zip(owners, items, strict=True)]
        for owner, item, score in zip(owners, items, scores, strict=True):
            _store(owner).record(item["id"], score)
        versions = []
        for handle in sorted({id(h): h for h in owners}.values(), key=lambda h: h.version):
            online = _store(handle).online
            versions.append({"version": str(handle.version), "scored": sum(o is handle for o in owners),
                             "online": online.value, "count": online.count, "build": online.built})  # fmt: skip
        return {"name": name, "metric": _store(scorable[0]).online.metric, "scored": len(scores), "versions": versions}

    def drift(self, name: str, version: str | None) -> dict[str, Any]:
        """Input and prediction PSI against the build's reference."""
        handle = self.repository.get(name, version)
        if handle.drift is None:
            raise NotFoundError(f"{name}:{handle.version} has no reference distributions (built without evaluation)")
        return {"name": name, "version": str(handle.version), **handle.drift.report()}
