"""The artifact folder: model files plus manifest.json, written once and verified on every read."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import ValidationError

from shipyard.artifact.hashing import content_hash, sha256_file
from shipyard.artifact.manifest import (
    MANIFEST_NAME,
    FileEntry,
    GenerationRecord,
    LineageStep,
    Manifest,
    TokenizerRecord,
    environment,
    interface,
    utc_now,
)
from shipyard.artifact.signing import SIGNATURE_FILE
from shipyard.errors import IntegrityError
from shipyard.spec.models import SignatureSpec


def safe_relative(path: str) -> PurePosixPath:
    """A manifest path that stays inside the artifact folder, or IntegrityError."""
    rel = PurePosixPath(path)
    if rel.is_absolute() or not rel.parts or any(p in ("", ".", "..") for p in rel.parts) or "\\" in path:
        raise IntegrityError(f"artifact path escapes its folder: {path!r}")
    return rel


def _payload_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def folder_size(folder: Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_manifest(folder: Path, manifest: Manifest) -> None:
    (folder / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")


def create_manifest(
    folder: Path,
    *,
    name: str,
    model_file: str,
    signature: SignatureSpec,
    description: str = "",
    metrics: dict[str, float] | None = None,
    lineage: list[LineageStep] | None = None,
    spec: dict[str, Any] | None = None,
    encryption: dict[str, str] | None = None,
    tokenizer: TokenizerRecord | None = None,
    generation: GenerationRecord | None = None,
) -> Manifest:
    """Hash every file under `folder` and write its manifest.json (version left for the registry)."""
    files = [
        FileEntry(path=p.relative_to(folder).as_posix(), sha256=sha256_file(p), size=p.stat().st_size)
        for p in _payload_files(folder)
    ]
    if model_file not in {f.path for f in files}:
        raise IntegrityError(f"model file {model_file!r} is not in the artifact folder {folder}")
    manifest = Manifest(
        name=name,
        created_at=utc_now(),
        description=description,
        model_file=model_file,
        signature=signature,
        files=files,
        content_hash=content_hash(((f.path, f.sha256) for f in files), interface(signature, tokenizer, generation)),
        metrics=dict(metrics or {}),
        lineage=list(lineage or []),
        environment=environment(),
        spec=spec,
        encryption=encryption,
        tokenizer=tokenizer,
        generation=generation,
    )
    write_manifest(folder, manifest)
    return manifest


def read_manifest(folder: Path) -> Manifest:
    """Parse manifest.json without checking file hashes."""
    path = folder / MANIFEST_NAME
    try:
        return Manifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise IntegrityError(f"{folder}: no {MANIFEST_NAME}: not a Shipyard artifact") from None
    except (ValueError, ValidationError) as exc:
        raise IntegrityError(f"{path}: unreadable manifest: {str(exc).splitlines()[0]}") from None


def verify_artifact(folder: Path) -> Manifest:
    """Check every listed file's size and sha256, that nothing unlisted is present, and the content hash.

    Returns the manifest; raises IntegrityError naming the first problem found.
    """
    manifest = read_manifest(folder)
    listed = set()
    for entry in manifest.files:
        rel = safe_relative(entry.path)
        listed.add(rel.as_posix())
        path = folder.joinpath(*rel.parts)
        if not path.is_file() or path.is_symlink():
            raise IntegrityError(f"{folder}: missing file {entry.path}")
        if path.stat().st_size != entry.size or sha256_file(path) != entry.sha256:
            raise IntegrityError(f"{folder}: {entry.path} does not match its recorded sha256 (modified or corrupt)")
    extra = [p.relative_to(folder).as_posix() for p in _payload_files(folder)]
    unexpected = sorted(set(extra) - listed - {SIGNATURE_FILE})  # the signature covers the files, not itself
    if unexpected:
        raise IntegrityError(f"{folder}: files not in the manifest: {', '.join(unexpected)}")
    expected = content_hash(((f.path, f.sha256) for f in manifest.files), manifest.interface())
    if expected != manifest.content_hash:
        raise IntegrityError(f"{folder}: content hash does not match the manifest")
    return manifest
