from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import fsspec
import pytest

from shipyard.errors import ConflictError, IntegrityError, InvalidInputError, NotFoundError
from shipyard.pipeline import import_onnx
from shipyard.registry import LocalRegistry, remote
from shipyard.registry.remote import pull, push
from shipyard.settings import Environment
from tests._helpers import publish
from tests.conftest import CliResult


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
    schemes = frozenset({"file", "memory"})  # memory:// is enabled explicitly, as a user would with the setting
    push(registry, "m", "memory://bucket/m.tar.gz", schemes)
    assert fsspec.filesystem("memory").exists("/bucket/m.tar.gz")
    assert pull(LocalRegistry(tmp_path / "other"), "memory://bucket/m.tar.gz", schemes).name == "m"


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


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1:9/a.shipyard.tar.gz",
        "ftp://host/a.tar.gz",
        "memory://a.shipyard.tar.gz",
        "github://org:repo@main/a.tar.gz",
        "simplecache::s3://bucket/a.tar.gz",
        "data:,hello",  # fsspec's data protocol is written without "//"
    ],
)
def test_only_enabled_storage_schemes_are_reached(registry: LocalRegistry, mlp_onnx: Path, uri: str) -> None:
    """fsspec speaks many protocols; a spec, a variable or a container argument reaches only file and s3."""
    import_onnx(mlp_onnx, "mlp", registry)
    with pytest.raises(InvalidInputError, match="is not an enabled storage scheme"):
        remote.pull(registry, uri)
    with pytest.raises(InvalidInputError, match="is not an enabled storage scheme"):
        remote.push(registry, "mlp:1", uri)


def test_more_storage_schemes_by_an_explicit_setting(
    registry: LocalRegistry, mlp_onnx: Path, monkeypatch: pytest.MonkeyPatch, cli: Callable[..., CliResult]
) -> None:
    import_onnx(mlp_onnx, "mlp", registry)
    refused = cli("push", "mlp:1", "memory://store/", "-r", str(registry.root))
    assert refused.code == 2
    assert "SHIPYARD_STORAGE_SCHEMES" in refused.err
    monkeypatch.setenv("SHIPYARD_STORAGE_SCHEMES", "memory")
    assert Environment.from_environ().storage_schemes == {"file", "s3", "memory"}
    pushed = cli("push", "mlp:1", "memory://store/", "-r", str(registry.root))
    assert pushed.code == 0, pushed.err
    assert pushed.out.strip() == "memory://store/mlp-1.shipyard.tar.gz"


def test_pull_keeps_the_version_number_and_refuses_a_clash(registry: LocalRegistry, tmp_path: Path) -> None:
    for payload in (b"one", b"two", b"three"):
        publish(registry, payload=payload)
    uri = push(registry, "m:3", f"file://{tmp_path}/store/")
    assert uri.endswith("m-3.shipyard.tar.gz")
    empty = LocalRegistry(tmp_path / "empty")
    assert pull(empty, uri).version == 3  # not renumbered to 1
    assert pull(empty, uri).version == 3  # pulling it again is the same version
    assert [r.ref for r in empty.all_versions()] == ["m:3"]
    assert publish(empty, payload=b"new") == 4  # local numbering continues after the kept number
    clash = LocalRegistry(tmp_path / "clash")
    for payload in (b"a", b"b", b"c"):
        publish(clash, payload=payload)
    with pytest.raises(ConflictError, match="m:3 already holds other content"):
        pull(clash, uri)
    assert len(clash.all_versions()) == 3
