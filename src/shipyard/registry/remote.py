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
from shipyard.artifact.manifest import Manifest
from shipyard.errors import IntegrityError, InvalidInputError, NotFoundError, UnavailableError
from shipyard.registry.local import LocalRegistry
from shipyard.settings import DEFAULT_STORAGE_SCHEMES, SCHEMES_ENV


def open_uri(uri: str, schemes: frozenset[str] = DEFAULT_STORAGE_SCHEMES) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a storage URI, after checking that every protocol in it (chained URLs too)
    is one the user allows; nothing is contacted before that."""
    parts = uri.split("::")
    for number, part in enumerate(parts):
        if "://" in part:
            scheme = part.split("://", 1)[0].lower()
        else:  # a protocol of its own in a chain ("simplecache::s3://…"), else a plain path
            scheme = part.lower() if number < len(parts) - 1 else "file"
        if scheme not in schemes:
            raise InvalidInputError(
                f"storage URI {uri!r}: {scheme}:// is not an enabled storage scheme (enabled: "
                f"{', '.join(sorted(schemes))}; enable more with ${SCHEMES_ENV}, comma-separated)"
            )
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as exc:
        raise InvalidInputError(f"cannot use storage URI {uri!r}: {exc}") from None
    # fsspec knows protocols written without "//" too ("data:,…"): what it chose must be enabled as well.
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & schemes:
        raise InvalidInputError(
            f"storage URI {uri!r}: {sorted(protocols)[0]}: is not an enabled storage scheme (enabled: "
            f"{', '.join(sorted(schemes))}; enable more with ${SCHEMES_ENV}, comma-separated)"
        )
    return fs, path


def folder_uri(uri: str) -> str:
    """The URI as a folder (ending in `/`), so names can be appended to it."""
    return uri if uri.endswith("/") else f"{uri}/"


def archive_name(name: str, version: int | None) -> str:
    """How `push` names a version's archive inside a folder URI."""
    return f"{name}-{version}{ARCHIVE_SUFFIX}"


def _archive_uri(uri: str, manifest: Manifest) -> str:
    return f"{uri}{archive_name(manifest.name, manifest.version)}" if uri.endswith("/") else uri


def push(registry: LocalRegistry, ref: str, uri: str, schemes: frozenset[str] = DEFAULT_STORAGE_SCHEMES) -> str:
    """Verify a version and upload it as an archive to `uri` (a file URI, or a folder ending in `/`).

    The object is written under a temporary name and moved into place, so readers never see a
    partial archive. Returns the archive's URI.
    """
    manifest = registry.manifest(ref, verify=True)
    target = _archive_uri(uri, manifest)
    fs, path = open_uri(target, schemes)
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
        except Exception as exc:  # OSError, and storage clients' own errors (botocore's missing credentials)
            raise UnavailableError(f"cannot write {target}: {type(exc).__name__}: {exc}") from None
    return target


def pull(registry: LocalRegistry, uri: str, schemes: frozenset[str] = DEFAULT_STORAGE_SCHEMES) -> Manifest:
    """Download an archive, check its sidecar checksum and every file hash, and publish it locally.

    The version keeps the number it has in the archive, so releases, metrics, canary rules and feedback
    agree with the source registry. Returns its manifest (the existing one when that number already holds
    this content); raises IntegrityError for tampered or corrupt archives and ConflictError when the number
    holds other content (nothing is registered then).
    """
    fs, path = open_uri(uri, schemes)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / f"a{ARCHIVE_SUFFIX}"
        try:
            fs.get_file(path, str(archive))
        except FileNotFoundError:
            raise NotFoundError(f"no archive at {uri}") from None
        except Exception as exc:  # OSError, and storage clients' own errors (botocore's missing credentials)
            raise UnavailableError(f"cannot read {uri}: {type(exc).__name__}: {exc}") from None
        sidecar = f"{path}.sha256"
        if fs.exists(sidecar):
            expected = fs.cat_file(sidecar).decode().split()[0]
            actual = sha256_file(archive)
            if expected != actual:
                raise IntegrityError(f"{uri}: archive sha256 {actual[:12]}… does not match its .sha256 sidecar")
        with registry.stage() as staged:
            unpack(archive, staged)
            return registry.publish(staged, keep_version=True)  # verifies every file first
