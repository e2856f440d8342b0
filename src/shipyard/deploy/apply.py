"""Converge a target to the spec (apply) or to an earlier release (rollback); idempotent."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shipyard.deploy import docker
from shipyard.deploy.bundle import Bundle
from shipyard.deploy.local import SERVICE_FILE, LocalService, ServiceState
from shipyard.deploy.releases import Plan, Release, ReleaseStore, materialize, render
from shipyard.errors import ConflictError, IntegrityError
from shipyard.registry import remote
from shipyard.registry.local import LocalRegistry
from shipyard.settings import DEFAULT_STORAGE_SCHEMES
from shipyard.spec.loader import LoadedSpec


@dataclass
class Outcome:
    plan: Plan
    release: Release | None  # the new release; None when nothing had to change
    service: ServiceState | None = None  # the local target's running service


def state_dir(loaded: LoadedSpec) -> Path:
    return loaded.base_dir / ".shipyard"


def store_for(loaded: LoadedSpec, target: str) -> ReleaseStore:
    return ReleaseStore(state_dir(loaded), loaded.spec.name, target)


def local_service(loaded: LoadedSpec) -> LocalService:
    return LocalService(state_dir(loaded) / "local" / loaded.spec.name)


def plan(loaded: LoadedSpec, registry: LocalRegistry, target: str | None = None) -> Plan:
    bundle = render(loaded, registry, target)
    return store_for(loaded, bundle.target).plan(bundle)


def apply(
    loaded: LoadedSpec, registry: LocalRegistry, target: str | None = None,
    schemes: frozenset[str] = DEFAULT_STORAGE_SCHEMES,
) -> Outcome:  # fmt: skip
    """Converge the target to the spec; with `deploy.registry_uri`, the archives the servers will pull are
    pushed there (through the enabled storage `schemes`) before the release is recorded."""
    bundle = render(loaded, registry, target)
    return _converge(loaded, registry, store_for(loaded, bundle.target), bundle, None, schemes)


def rollback(
    loaded: LoadedSpec, registry: LocalRegistry, number: int | None, target: str | None = None,
    schemes: frozenset[str] = DEFAULT_STORAGE_SCHEMES,
) -> Outcome:  # fmt: skip
    """Apply release `number` (default: the one before the current) again, as a new release."""
    store = store_for(loaded, target or loaded.spec.deploy.target)
    numbers = store.numbers()
    if number is None:
        if len(numbers) < 2:
            raise ConflictError(f"nothing to roll back to: {len(numbers)} release(s) for target {store.target}")
        number = numbers[-2]
    chosen = store.get(number)
    return _converge(loaded, registry, store, store.bundle_of(chosen), number, schemes)


def _check_models(bundle: Bundle, registry: LocalRegistry) -> None:
    for model in bundle.models:
        record = registry.resolve(f"{model.name}:{model.version}")
        if record.content_hash != model.content_hash:
            raise IntegrityError(f"{model.name}:{model.version} in the registry is not the version the release pinned")


def _push_archives(loaded: LoadedSpec, registry: LocalRegistry, bundle: Bundle, schemes: frozenset[str]) -> None:
    """Upload every pinned version to `deploy.registry_uri`, where the rendered servers pull them at start."""
    uri = loaded.spec.deploy.registry_uri
    if uri is None or bundle.target == "local":
        return
    for model in bundle.models:
        remote.push(registry, f"{model.name}:{model.version}", remote.folder_uri(uri), schemes)


def _converge(loaded: LoadedSpec, registry: LocalRegistry, store: ReleaseStore, bundle: Bundle,
              rollback_of: int | None, schemes: frozenset[str]) -> Outcome:  # fmt: skip
    _check_models(bundle, registry)
    planned = store.plan(bundle)
    out = loaded.base_dir / loaded.spec.deploy.output
    current = planned.current
    service = local_service(loaded) if bundle.target == "local" else None
    running = service.state() if service is not None else None
    up_to_date = service is None or (running is not None and current is not None and running.release == current.number)
    if planned.empty and current is not None and up_to_date:
        return Outcome(planned, None, running)
    _push_archives(loaded, registry, bundle, schemes)  # before anything is written: a failed upload changes nothing
    previous = store.files(current) if current is not None else {}
    materialize(bundle, out, previous)
    if bundle.target in ("docker", "kubernetes", "kserve"):
        docker.write_assets(loaded, bundle, registry, out)
    if service is None:
        return Outcome(planned, store.record(bundle, rollback_of))
    number = (store.numbers() or [0])[-1] + (0 if planned.empty else 1)
    service.stop()
    try:
        started = service.start(out / SERVICE_FILE, number, [f"{m.name}:{m.version}" for m in bundle.models])
    except Exception:
        materialize(Bundle(bundle.target, [], previous), out, bundle.files)  # put the old files back
        if running is not None and current is not None:
            service.start(out / SERVICE_FILE, current.number, running.models)
        raise
    release = None if planned.empty else store.record(bundle, rollback_of)
    return Outcome(planned, release, started)


def status(loaded: LoadedSpec) -> dict[str, object]:
    """The local service's state and health, and the latest release of each target."""
    service = local_service(loaded)
    state = service.state()
    releases = {}
    folder = state_dir(loaded) / "releases" / loaded.spec.name
    if folder.is_dir():
        for target in sorted(p.name for p in folder.iterdir()):
            current = store_for(loaded, target).current()
            if current is not None:
                releases[target] = current.number
    return {
        "local": None if state is None else {**json.loads(service.state_file.read_text()),
                                             "ready": service.ready(state), "supervised": service.supervised(state)},
        "releases": releases,
    }  # fmt: skip
