"""The model-quality extensions: labels posted as feedback, and input / prediction drift."""

from __future__ import annotations

from typing import Any

from shipyard.errors import NotFoundError
from shipyard.serve.core.loaded import LoadedModel, TensorModel
from shipyard.serve.core.repository import ModelRepository
from shipyard.serve.observe.drift import DriftCounts, DriftMonitor
from shipyard.serve.observe.feedback import FeedbackStore, OnlineMetric


def _store(handle: LoadedModel) -> FeedbackStore:
    if not isinstance(handle, TensorModel) or handle.feedback is None:
        raise NotFoundError(f"{handle.name}:{handle.version}: no online metric (the build had no scorable evaluation)")
    return handle.feedback


class QualityMonitor:
    """One worker's part of the feedback and drift extensions (serverwide.py combines every worker's)."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def _scorable(self, name: str, version: str | None) -> list[TensorModel]:
        if version:
            handles = [self.repository.get(name, version)]
        else:
            handles = [self.repository.get(name, str(v)) for v in self.repository.versions(name)] or [
                self.repository.get(name)  # the repository's own "not loaded" error
            ]
        scorable = [h for h in handles if isinstance(h, TensorModel) and h.feedback is not None]
        if not scorable:
            raise NotFoundError(f"{name}: no online metric (the build had no scorable evaluation)")
        return scorable

    def score(self, name: str, version: str | None, items: list[dict[str, Any]]) -> list[tuple[int, float] | None]:
        """For each posted label ({"id", "label"}): (version, score) from the version here that answered that
        request id, or None when none here did. Changes nothing; InvalidInputError for a label that does not fit."""
        scorable = self._scorable(name, version)
        scores: list[tuple[int, float] | None] = []
        for item in items:
            owner = next((h for h in scorable if _store(h).knows(item["id"])), None)
            scores.append(None if owner is None else (owner.version, _store(owner).evaluate(item["id"], item["label"])))
        return scores

    def record(self, name: str, scores: list[tuple[int, str, float]]) -> dict[int, OnlineMetric]:
        """Count scored labels ((version, request id, score)) into the versions' online metrics; every scorable
        version's metric afterwards."""
        for version, request_id, value in scores:
            _store(self.repository.get(name, str(version))).record(request_id, value)
        return {h.version: _store(h).online for h in self._scorable(name, None)}

    def drift_monitor(self, name: str, version: str | None) -> tuple[int, DriftMonitor]:
        """The version's drift monitor; NotFoundError for one built without reference distributions."""
        handle = self.repository.get(name, version)
        if not isinstance(handle, TensorModel) or handle.drift is None:
            raise NotFoundError(f"{name}:{handle.version} has no reference distributions (built without evaluation)")
        return handle.version, handle.drift

    def drift_counts(self, name: str, version: str | None) -> tuple[int, DriftCounts]:
        """The answering version's drift window as bin counts."""
        answered, drift = self.drift_monitor(name, version)
        return answered, drift.counts()
