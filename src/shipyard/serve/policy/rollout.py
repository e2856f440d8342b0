"""Rollouts inside the server: canary weights per model name, and shadow versions that see traffic silently.

A request that names no version is answered by the primary version: the newest loaded version that is not
a shadow. `--canary mlp:2=10` sends 10 % of them to version 2 instead. A shadow (`--shadow mlp:3=20`) never
answers a versionless request: it receives a copy of 20 % of the requests answered for `mlp`, its outputs are
compared with the answer the client got and counted, never returned. A request that names a version is
answered by that version, shadow or not (that is how a shadow is tried directly). Shadow work is bounded:
when too many copies are in flight, new ones are skipped (and counted), so a slow shadow cannot slow the
primary path.
"""

from __future__ import annotations

import random
import re
from collections.abc import Awaitable
from dataclasses import dataclass, field

import numpy as np

from shipyard.errors import InvalidInputError

_RULE = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+):(?P<version>\d+)=(?P<percent>\d+(\.\d+)?)$")
SHADOW_IN_FLIGHT = 32


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc":
        return bool(np.allclose(a, b, rtol=1e-3, atol=1e-5))
    return bool(np.array_equal(a, b))


def parse_rules(rules: list[str], what: str) -> dict[str, dict[int, float]]:
    """`NAME:VERSION=PERCENT` rules as {name: {version: fraction}}; InvalidInputError for bad ones."""
    parsed: dict[str, dict[int, float]] = {}
    for rule in rules:
        match = _RULE.match(rule)
        if match is None:
            raise InvalidInputError(f"--{what} {rule!r}: write NAME:VERSION=PERCENT, e.g. mlp:2=10")
        percent = float(match["percent"])
        if not 0 < percent <= 100:
            raise InvalidInputError(f"--{what} {rule!r}: the percentage must be in (0, 100]")
        parsed.setdefault(match["name"], {})[int(match["version"])] = percent / 100
    for name, weights in parsed.items():
        if sum(weights.values()) > 1 + 1e-9:
            raise InvalidInputError(f"--{what} for {name}: the percentages add up to more than 100")
    return parsed


@dataclass
class ShadowCounts:
    agree: int = 0
    disagree: int = 0
    error: int = 0
    skipped: int = 0

    def __add__(self, other: ShadowCounts) -> ShadowCounts:
        return ShadowCounts(self.agree + other.agree, self.disagree + other.disagree, self.error + other.error,
                            self.skipped + other.skipped)  # fmt: skip


@dataclass
class Rollout:
    """Routing rules and shadow bookkeeping for the data plane."""

    canary: dict[str, dict[int, float]] = field(default_factory=dict)
    shadow: dict[str, dict[int, float]] = field(default_factory=dict)
    counts: dict[tuple[str, int], ShadowCounts] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)
    _in_flight: int = 0

    def governs(self, name: str) -> bool:
        """Whether versionless requests for `name` are routed by a rule (else: the newest loaded version)."""
        return name in self.canary or name in self.shadow

    def primary(self, name: str, loaded: list[int]) -> int | None:
        """The newest loaded version that is not a shadow (None: every loaded version is one)."""
        shadows = self.shadow.get(name, {})
        answering = [v for v in loaded if v not in shadows]
        return max(answering) if answering else None

    def route(self, name: str, loaded: list[int]) -> int | None:
        """The version a versionless request for `name` goes to: a canary by its weight, else the primary."""
        shadows = self.shadow.get(name, {})
        weights = {v: w for v, w in self.canary.get(name, {}).items() if v in loaded and v not in shadows}
        draw = self.rng.random()
        for version, weight in weights.items():
            if draw < weight:
                return version
            draw -= weight
        return self.primary(name, [v for v in loaded if v not in weights])

    def shadows_for(self, name: str, served: int, loaded: list[int]) -> list[int]:
        """Versions that should also see this request (not the one that answered it)."""
        picks = []
        for version, fraction in self.shadow.get(name, {}).items():
            if version != served and version in loaded and self.rng.random() < fraction:
                if self._in_flight >= SHADOW_IN_FLIGHT:
                    self.counts.setdefault((name, version), ShadowCounts()).skipped += 1
                    continue
                picks.append(version)
        return picks

    async def compare(
        self, name: str, version: int, shadow: Awaitable[list[np.ndarray]], answered: list[np.ndarray]
    ) -> None:
        """Await the shadow's outputs and count whether they agree with what the client got."""
        counts = self.counts.setdefault((name, version), ShadowCounts())
        self._in_flight += 1
        try:
            outputs = await shadow
        except Exception:
            counts.error += 1
            return
        finally:
            self._in_flight -= 1
        same = len(outputs) == len(answered) and all(_same(a, b) for a, b in zip(outputs, answered, strict=True))
        if same:
            counts.agree += 1
        else:
            counts.disagree += 1
