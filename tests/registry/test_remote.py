from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import fsspec
import pytest

from shipyard.errors import IntegrityError, NotFoundError
from shipyard.registry import LocalRegistry
from shipyard.registry.remote import pull, push
from tests._helpers import publish


def test_push_pull_round_trip_through_a_file_uri(registry: LocalRegistry, tmp_path: Path) -> None:
    publish(registry, payload=b"weights")
    target = push(registry, "m:1", f"file://{tmp_path}/store/")
    assert target.endswith("store/m-1.shipyard.tar.gz")
    assert (tmp_path / "store" / "m-1.shipyard.tar.gz.sha256").is_file()
    assert not list((tmp_path / "store").glob("*.partial-*"))
    other = LocalRegistry(tmp_path / "other")
    manifest = pull(other, target)
    assert manifest.version == 1
    assert manifest.content_hash == registry.manifest("m:1").content_hash
    other.manifest("m:1", verify=True)


def test_push_pull_through_fsspec_memory(registry: LocalRegistry, tmp_path: Path) -> None:
    publish(registry, payload=b"weights")
    push(registry, "m", "memory://bucket/m.tar.gz")
    assert fsspec.filesystem("memory").exists("/bucket/m.tar.gz")
    assert pull(LocalRegistry(tmp_path / "other"), "memory://bucket/m.tar.gz").name == "m"


def test_archive_not_matching_its_checksum_is_refused(registry: LocalRegistry, tmp_path: Path) -> None:
    publish(registry)
    target = Path(push(registry, "m:1", f"{tmp_path}/a.tar.gz"))
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    other = LocalRegistry(tmp_path / "other")
    with pytest.raises(IntegrityError, match=r"does not match its \.sha256 sidecar"):
        pull(other, str(target))
    assert other.all_versions() == []


def test_tampered_content_with_forged_checksum_is_refused(registry: LocalRegistry, tmp_path: Path) -> None:
    publish(registry, payload=b"honest weights")
    target = Path(push(registry, "m:1", f"{tmp_path}/a.tar.gz"))
    # Rewrite the model inside the archive and recompute the sidecar: the manifest hashes still catch it.
    with tarfile.open(target) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]  # type: ignore[union-attr]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member, payload in members:
            payload = b"evil weights!!" if member.name == "model.onnx" else payload
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    target.write_bytes(gzip.compress(buffer.getvalue()))
    Path(f"{target}.sha256").write_text(hashlib.sha256(target.read_bytes()).hexdigest() + "  a.tar.gz\n")
    other = LocalRegistry(tmp_path / "other")
    with pytest.raises(IntegrityError, match=r"model\.onnx does not match its recorded sha256"):
        pull(other, str(target))
    assert other.all_versions() == []
    assert not any((other.root / ".staging").iterdir())


def test_pull_missing_archive(registry: LocalRegistry, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no archive"):
        pull(registry, f"{tmp_path}/nothing.tar.gz")
