"""Artifacts: manifest, hashing, verification and the transport archive."""

from __future__ import annotations

from shipyard.artifact.archive import pack, unpack
from shipyard.artifact.layout import create_manifest, read_manifest, verify_artifact
from shipyard.artifact.manifest import LineageStep, Manifest

__all__ = ["LineageStep", "Manifest", "create_manifest", "pack", "read_manifest", "unpack", "verify_artifact"]
