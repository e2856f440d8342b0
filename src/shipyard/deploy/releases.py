"""Numbered releases: plan (what would change), apply (converge), rollback (re-apply an earlier release).

A release is the rendered files and the pinned models, kept under `.shipyard/releases/NAME/TARGET/N/`
next to the spec. Rolling back applies an earlier release's files as a new release, so history only grows.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shipyard.deploy import docker, kserve, kubernetes, local, ray
from shipyard.deploy.bundle import Bundle, PinnedModel, pin_models
from shipyard.deploy.capacity import sized
from shipyard.errors import InvalidInputError, NotFoundError, SpecError
from shipyard.registry.local import LocalRegistry
from shipyard.spec.loader import LoadedSpec


def render(loaded: LoadedSpec, registry: LocalRegistry, target: str | None = None) -> Bundle:
    """The files the spec's `deploy:` section renders to for `target` (default: deploy.target)."""
    chosen = target or loaded.spec.deploy.target
    loaded = sized(loaded)
    if chosen in ("kubernetes", "kserve") and loaded.spec.deploy.image is None:
        raise SpecError(f"{loaded.path}: deploy.image: target {chosen} needs the container image the cluster pulls")
    bundle = Bundle(target=chosen, models=pin_models(loaded, registry))
    if chosen == "local":
        local.render(loaded, bundle, registry)
    elif chosen == "docker":
        docker.render(loaded, bundle)
    elif chosen == "kubernetes":
        kubernetes.render(loaded, bundle)
    elif chosen == "kserve":
        kserve.render(loaded, bundle)
    elif chosen == "ray":
        ray.render(loaded, bundle, registry)
    else:
        raise InvalidInputError(f"unknown deploy target {chosen!r}: local, docker, kubernetes, kserve or ray")
    return bundle


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Release:
    number: int
    target: str
    created_at: float
    models: list[PinnedModel]
    files: dict[str, str]  # path -> sha256 of its text
    rollback_of: int | None = None

    @classmethod
    def read(cls, folder: Path) -> Release:
        data = json.loads((folder / "release.json").read_text())
        data["models"] = [PinnedModel(**m) for m in data["models"]]
        return cls(**data)


@dataclass
class Change:
    path: str
    action: str  # "add", "change" or "remove"
    diff: list[str] = field(default_factory=list)


@dataclass
class Plan:
    target: str
    current: Release | None
    models: list[tuple[str, str, str]]  # (name, from, to) for each model that changes
    changes: list[Change]

    @property
    def empty(self) -> bool:
        return not self.changes and not self.models


class ReleaseStore:
    """The releases of one model name and target."""

    def __init__(self, root: Path, name: str, target: str) -> None:
        self.folder = root / "releases" / name / target
        self.target = target

    def numbers(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(p.name) for p in self.folder.iterdir() if p.name.isdigit() and (p / "release.json").exists())

    def get(self, number: int) -> Release:
        if number not in self.numbers():
            raise NotFoundError(f"no release {number} for target {self.target} (releases: {self.numbers() or 'none'})")
        return Release.read(self.folder / str(number))

    def current(self) -> Release | None:
        numbers = self.numbers()
        return Release.read(self.folder / str(numbers[-1])) if numbers else None

    def files(self, release: Release) -> dict[str, str]:
        base = self.folder / str(release.number) / "files"
        return {path: (base / path).read_text() for path in release.files}

    def plan(self, bundle: Bundle) -> Plan:
        current = self.current()
        old = self.files(current) if current is not None else {}
        changes = []
        for path in sorted(set(old) | set(bundle.files)):
            before, after = old.get(path), bundle.files.get(path)
            if before == after:
                continue
            action = "add" if before is None else "remove" if after is None else "change"
            diff = list(difflib.unified_diff((before or "").splitlines(), (after or "").splitlines(),
                                             f"release {current.number if current else 0}/{path}", f"new/{path}",
                                             lineterm="", n=1))  # fmt: skip
            changes.append(Change(path, action, diff))
        was = {m.name: m for m in current.models} if current is not None else {}
        now = {m.name: m for m in bundle.models}
        models = [(name, f"{was[name].version}" if name in was else "-", f"{now[name].version}" if name in now else "-")
                  for name in sorted(set(was) | set(now)) if was.get(name) != now.get(name)]  # fmt: skip
        return Plan(bundle.target, current, models, changes)

    def record(self, bundle: Bundle, rollback_of: int | None = None) -> Release:
        """Write `bundle` as the next release (through a temporary folder, so a crash leaves no half release)."""
        number = (self.numbers() or [0])[-1] + 1
        staging = self.folder / f".{number}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        for path, text in bundle.files.items():
            dest = staging / "files" / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
        release = Release(number, bundle.target, time.time(), bundle.models,
                          {p: _digest(t) for p, t in bundle.files.items()}, rollback_of)  # fmt: skip
        record: dict[str, Any] = asdict(release)
        (staging / "release.json").write_text(json.dumps(record, indent=2))
        staging.rename(self.folder / str(number))
        return release

    def bundle_of(self, release: Release) -> Bundle:
        return Bundle(target=release.target, models=list(release.models), files=self.files(release))


def materialize(bundle: Bundle, out: Path, previous: dict[str, str]) -> None:
    """Write the bundle's files under `out`, removing files an earlier release wrote that are gone now."""
    for path in set(previous) - set(bundle.files):
        (out / path).unlink(missing_ok=True)
    for path, text in bundle.files.items():
        dest = out / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
