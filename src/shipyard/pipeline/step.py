"""The one interface every pipeline step implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from shipyard.pipeline.context import BuildContext


class Progress(Protocol):
    """Where a step reports progress on long loops (a rich progress bar in the CLI)."""

    def update(self, completed: float, total: float) -> None: ...


class NullProgress:
    def update(self, completed: float, total: float) -> None:
        return None


class Step(Protocol):
    """One stage of the build: reads and extends the context, returns its lineage parameters."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    def run(self, ctx: BuildContext, progress: Progress) -> dict[str, Any]:
        """Do the work; the returned parameters are recorded in the manifest's lineage."""
        ...


@dataclass(frozen=True)
class ActionStep:
    """A step whose work is one callable (a model family's method)."""

    name: str
    description: str
    action: Callable[[BuildContext, Progress], dict[str, Any]]

    def run(self, ctx: BuildContext, progress: Progress) -> dict[str, Any]:
        return self.action(ctx, progress)
