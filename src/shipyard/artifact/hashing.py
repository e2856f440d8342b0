"""sha256 of files and the stable content hash of an artifact."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(files: Iterable[tuple[str, str]], signature: object) -> str:
    """Hash of (relative path, sha256) pairs and the signature: equal for equal model content.

    Timestamps, versions and measured figures are left out on purpose, so rebuilding the same
    model from the same inputs gives the same hash.
    """
    payload = {"files": sorted(files), "signature": signature}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
