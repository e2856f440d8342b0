"""Move versions between the local registry and any fsspec URI as single-file archives.

Each archive travels with a `.sha256` sidecar; pull checks it, then the artifact's own
per-file hashes, before anything becomes visible in the registry.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import fsspec

from shipyard.artifact.archive import ARCHIVE_SUFFIX, pack, unpack
from shipyard.artifact.hashing import sha256_file
from shipyard.artifact.layout import verify_artifact
from shipyard.artifact.manifest import Manifest
from shipyard.errors import IntegrityError, InvalidInputError, NotFoundError, UnavailableError
from shipyard.registry.local import LocalRegistry


def folder_uri(uri: str) -> str:
    """The URI as a folder (ending in `/`), so names can be appended to it."""
    return uri if uri.endswith("/") else f"{uri}/"


def archive_name(name: str, version: int | None) -> str:
    """How `push` names a version's archive inside a folder URI."""
    return f"{name}-{version}{ARCHIVE_SUFFIX}"


def _archive_uri(uri: str, manifest: Manifest) -> str:
    return f"{uri}{archive_name(manifest.name, manifest.version)}" if uri.endswith("/") else uri


def push(registry: LocalRegistry, ref: str, uri: str) -> str:
    """Verify a version and upload it as an archive to `uri` (a file URI, or a folder ending in `/`).

    The object is written under a temporary name and moved into place, so readers never see a
    partial archive. Returns the archive's URI.
    """
    manifest = registry.manifest(ref, verify=True)
    target = _archive_uri(uri, manifest)
    try:
        fs, path = fsspec.core.url_to_fs(target)
    except (ValueError, ImportError) as exc:
        raise InvalidInputError(f"cannot use storage URI {uri!r}: {exc}") from None
    with tempfile.TemporaryDirectory() as tmp:
        archive = pack(registry.path(ref), Path(tmp) / f"a{ARCHIVE_SUFFIX}")
        digest = sha256_file(archive)
        partial = f"{path}.partial-{uuid.uuid4().hex}"
        try:
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            if parent:
                fs.makedirs(parent, exist_ok=True)
            fs.put_file(str(archive), partial)
            fs.mv(partial, path)
            fs.pipe_file(f"{path}.sha256", f"{digest}  {Path(path).name}\n".encode())
        except OSError as exc:
            raise UnavailableError(f"cannot write {target}: {exc}") from None
    return target


def pull(registry: LocalRegistry, uri: str) -> Manifest:
    """Download an archive, check its sidecar checksum and every file hash, and publish it locally.

    Returns the manifest of the new local version (or of the existing one with the same content);
    raises IntegrityError for tampered or corrupt archives (nothing is registered then).
    """
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as exc:
        raise InvalidInputError(f"cannot use storage URI {uri!r}: {exc}") from None
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / f"a{ARCHIVE_SUFFIX}"
        try:
            fs.get_file(path, str(archive))
        except FileNotFoundError:
            raise NotFoundError(f"no archive at {uri}") from None
        except OSError as exc:
            raise UnavailableError(f"cannot read {uri}: {exc}") from None
        sidecar = f"{path}.sha256"
        if fs.exists(sidecar):
            expected = fs.cat_file(sidecar).decode().split()[0]
            actual = sha256_file(archive)
            if expected != actual:
                raise IntegrityError(f"{uri}: archive sha256 {actual[:12]}… does not match its .sha256 sidecar")
        with registry.stage() as staged:
            unpack(archive, staged)
            manifest = verify_artifact(staged)
            # Pulling the same archive again (a restarted container) reuses the version it made.
            same = [
                r
                for r in registry.all_versions()
                if r.name == manifest.name and r.content_hash == manifest.content_hash
            ]
            if same:
                return registry.manifest(same[-1])
            return registry.publish(staged)
