"""Keeping a registry healthy: garbage collection, re-validation, backup and restore.

`validate` re-runs a version's evaluation (the dataset and metric from its own build spec) and fails
when the metric has drifted from the build-time value by more than the budget, for cron and CI.
Backups are the same verified archives `push` writes, plus an aliases file; restoring maps aliases by
content hash, so the numbering of the restored registry does not matter.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from shipyard.artifact.archive import ARCHIVE_SUFFIX
from shipyard.artifact.encryption import model_source
from shipyard.errors import EvaluationError, FailedCheckError, NotFoundError, UnavailableError
from shipyard.onnxrt import ort_predict, run_in_chunks, session
from shipyard.pipeline import metrics
from shipyard.pipeline.datasets import load_dataset
from shipyard.pipeline.evaluate import output_index
from shipyard.registry import remote
from shipyard.registry.local import LocalRegistry, VersionRecord
from shipyard.settings import DEFAULT_STORAGE_SCHEMES
from shipyard.spec.loader import parse_spec
from shipyard.tokenizer import artifact_encoder

ALIASES_FILE = "aliases.json"


def collect_garbage(
    registry: LocalRegistry, keep: int, dry_run: bool = False, stale_after_s: float = 3600
) -> tuple[list[VersionRecord], list[Path]]:
    """Remove versions that are neither aliased nor among each model's newest `keep`, and staging folders
    older than `stale_after_s` (left by builds that crashed). Returns what was (or would be) removed."""
    doomed = []
    for name in registry.models():
        versions = registry.versions(name)
        recent = {r.version for r in versions[-keep:]} if keep > 0 else set()
        doomed += [r for r in versions if not r.aliases and r.version not in recent]
    staging = registry.root / ".staging"
    stale = (
        [p for p in staging.iterdir() if time.time() - p.stat().st_mtime > stale_after_s] if staging.is_dir() else []
    )
    if not dry_run:
        for record in doomed:
            registry.remove(record.ref)
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)
    return doomed, stale


@dataclass(frozen=True)
class Validation:
    ref: str
    metric: str
    built: float
    now: float
    drop: float
    budget: float

    @property
    def passed(self) -> bool:
        return self.drop <= self.budget


def validate(
    registry: LocalRegistry,
    ref: str,
    base_dir: Path,
    max_drop: float | None = None,
    encryption_key: bytes | None = None,
) -> Validation:
    """Re-evaluate a version on its build's evaluation set; FailedCheckError if the metric dropped too far."""
    record = registry.resolve(ref)
    manifest = registry.manifest(record, verify=True)
    if manifest.spec is None:
        raise EvaluationError(f"{record.ref} has no build spec to take the evaluation set from")
    spec = parse_spec(manifest.spec, source=f"{record.ref} manifest")
    evaluation = spec.evaluation
    if evaluation is None or evaluation.metric.name not in manifest.metrics:
        raise EvaluationError(f"{record.ref} was built without an evaluation: nothing to re-validate")
    text = artifact_encoder(registry.path(record), manifest)
    data = load_dataset(evaluation.dataset, manifest.signature, base_dir, evaluation.max_samples, text)
    source = model_source(registry.path(record), manifest, encryption_key)
    sess = session(source.model, side_files=source.side_files)
    pred = run_in_chunks(ort_predict(sess), data.inputs, manifest.signature)[
        output_index(evaluation, manifest.signature)
    ]
    now = metrics.compute(evaluation.metric, pred, data.target)
    built = manifest.metrics[evaluation.metric.name]
    drop = (built - now) if evaluation.metric.better == "maximize" else (now - built)
    budget = max_drop if max_drop is not None else (spec.optimize.max_drop if spec.optimize else 0.01)
    result = Validation(record.ref, evaluation.metric.name, built, now, drop, budget)
    if not result.passed:
        raise FailedCheckError(
            f"{record.ref}: {result.metric} is {now:.4f} now, {built:.4f} at build: a drop of {drop:.4f} "
            f"exceeds the budget {budget:g}"
        )
    return result


def backup(registry: LocalRegistry, uri: str, schemes: frozenset[str] = DEFAULT_STORAGE_SCHEMES) -> list[str]:
    """Push every version to the folder URI and write the aliases (by content hash) beside them."""
    base = remote.folder_uri(uri)
    fs, path = remote.open_uri(f"{base}{ALIASES_FILE}", schemes)
    written = [remote.push(registry, record.ref, base, schemes) for record in registry.all_versions()]
    aliases = [{"name": r.name, "alias": a, "content_hash": r.content_hash}
               for r in registry.all_versions() for a in r.aliases]  # fmt: skip
    try:
        fs.pipe_file(path, json.dumps(aliases, indent=2).encode())
    except OSError as exc:
        raise UnavailableError(f"cannot write {base}{ALIASES_FILE}: {exc}") from None
    return written


def restore(
    registry: LocalRegistry, uri: str, schemes: frozenset[str] = DEFAULT_STORAGE_SCHEMES
) -> list[VersionRecord]:
    """Pull every archive of a backup (verified, in name and version order) and re-create its aliases."""
    base = remote.folder_uri(uri)
    fs, path = remote.open_uri(base, schemes)
    try:
        names = sorted(fs.ls(path, detail=False))
    except FileNotFoundError:
        raise NotFoundError(f"no backup at {uri}") from None
    archives = [n for n in names if n.endswith(ARCHIVE_SUFFIX)]

    def order(name: str) -> tuple[str, int]:
        stem = Path(name).name[: -len(ARCHIVE_SUFFIX)]
        model, _, number = stem.rpartition("-")
        return model, int(number) if number.isdigit() else 0

    for archive in sorted(archives, key=order):
        remote.pull(registry, fs.unstrip_protocol(archive), schemes)
    aliases_path = f"{path.rstrip('/')}/{ALIASES_FILE}"
    aliases = json.loads(fs.cat_file(aliases_path)) if fs.exists(aliases_path) else []
    by_hash = {(r.name, r.content_hash): r for r in registry.all_versions()}
    for entry in aliases:
        record = by_hash.get((entry["name"], entry["content_hash"]))
        if record is not None:
            registry.set_alias(record.ref, entry["alias"])
    return registry.all_versions()
