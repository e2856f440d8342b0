"""One tried variant of the optimize search and its verdict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Candidate:
    """One tried variant and the verdict, as the report shows it."""

    trial: int
    step: str
    params: dict[str, Any]
    accepted: bool
    reason: str
    metric: float | None = None
    drop_bound: float | None = None
    p50_ms: float | None = None
    parent_p50_ms: float | None = None
    size_bytes: int | None = None
    token_agreement: float | None = (
        None  # language models: share of decided held-out positions whose greedy token agrees
    )
    memory_bytes: float | None = None  # language models judged by memory: resident bytes when served
    failed_guard: str | None = None  # "metric", "speed", "error" or "unavailable" (needs what is not here)
    built_on: int | None = None  # the trial whose model this one transformed (None: the unoptimized model)
    fallback: list[str] = field(default_factory=list)  # nodes kept in float
    path: Path | None = None

    def record(self) -> dict[str, Any]:
        """What the manifest keeps (the scratch path is not part of it)."""
        out = asdict(self)
        del out["path"]
        return out
