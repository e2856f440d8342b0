from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from shipyard.artifact import create_manifest, pack, unpack, verify_artifact
from shipyard.artifact.diff import diff_manifests
from shipyard.errors import IntegrityError
from shipyard.spec.models import SignatureSpec, TensorSpec

SIGNATURE = SignatureSpec(
    inputs=[TensorSpec(name="x", dtype="float32", shape=["batch", 4])],
    outputs=[TensorSpec(name="y", dtype="float32", shape=["batch", 2])],
)


def _artifact(folder: Path, payload: bytes = b"onnx-bytes", metrics: dict[str, float] | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(payload)
    (folder / "extra").mkdir()
    (folder / "extra" / "vocab.txt").write_text("a\nb\n")
    create_manifest(folder, name="m", model_file="model.onnx", signature=SIGNATURE, metrics=metrics)
    return folder


def test_manifest_lists_every_file_and_environment(tmp_path: Path) -> None:
    folder = _artifact(tmp_path / "a")
    manifest = verify_artifact(folder)
    assert sorted(f.path for f in manifest.files) == ["extra/vocab.txt", "model.onnx"]
    assert manifest.file("model.onnx").size == len(b"onnx-bytes")
    assert {"python", "onnx", "onnxruntime", "shipyard"} <= set(manifest.environment)
    assert manifest.version is None  # only the registry assigns versions


def test_content_hash_is_stable_and_content_sensitive(tmp_path: Path) -> None:
    a = verify_artifact(_artifact(tmp_path / "a", metrics={"latency": 1.0}))
    b = verify_artifact(_artifact(tmp_path / "b", metrics={"latency": 2.0}))
    c = verify_artifact(_artifact(tmp_path / "c", payload=b"other"))
    assert a.content_hash == b.content_hash  # measured figures and timestamps are not content
    assert a.content_hash != c.content_hash


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda f: (f / "model.onnx").write_bytes(b"onnx-bytez"), "does not match its recorded sha256"),
        (lambda f: (f / "model.onnx").unlink(), "missing file model.onnx"),
        (lambda f: (f / "planted.py").write_text("import os"), "files not in the manifest: planted.py"),
        (lambda f: (f / "manifest.json").write_text("{not json"), "unreadable manifest"),
    ],
)
def test_tampering_is_detected(tmp_path: Path, tamper: object, message: str) -> None:
    folder = _artifact(tmp_path / "a")
    tamper(folder)  # type: ignore[operator]
    with pytest.raises(IntegrityError, match=message):
        verify_artifact(folder)


def test_manifest_paths_cannot_escape(tmp_path: Path) -> None:
    folder = _artifact(tmp_path / "a")
    data = json.loads((folder / "manifest.json").read_text())
    data["files"][0]["path"] = "../outside"
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="escapes its folder"):
        verify_artifact(folder)


def test_archive_round_trip_is_reproducible(tmp_path: Path) -> None:
    folder = _artifact(tmp_path / "a")
    one = pack(folder, tmp_path / "one.tar.gz").read_bytes()
    two = pack(folder, tmp_path / "two.tar.gz").read_bytes()
    assert one == two
    unpack(tmp_path / "one.tar.gz", tmp_path / "out")
    assert verify_artifact(tmp_path / "out").content_hash == verify_artifact(folder).content_hash


def _evil_archive(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def _member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize(
    "member",
    [
        tarfile.TarInfo("../escape.txt"),
        tarfile.TarInfo("/abs/path.txt"),
        (
            lambda: (t := tarfile.TarInfo("link"), setattr(t, "type", tarfile.SYMTYPE), setattr(t, "linkname", "/etc"))[
                0
            ]
        )(),
        (lambda: (t := tarfile.TarInfo("dev"), setattr(t, "type", tarfile.CHRTYPE))[0])(),
    ],
    ids=["dotdot", "absolute", "symlink", "device"],
)
def test_unpack_refuses_hostile_members(tmp_path: Path, member: tarfile.TarInfo) -> None:
    archive = _evil_archive(tmp_path / "evil.tar.gz", member)
    with pytest.raises(IntegrityError):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unpack_rejects_garbage(tmp_path: Path) -> None:
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(IntegrityError, match="not a readable Shipyard archive"):
        unpack(tmp_path / "junk.tar.gz", tmp_path / "out")


def test_diff_reports_changed_fields(tmp_path: Path) -> None:
    a = verify_artifact(_artifact(tmp_path / "a", metrics={"accuracy": 0.9}))
    b = verify_artifact(_artifact(tmp_path / "b", payload=b"other", metrics={"accuracy": 0.95}))
    fields = {row[0]: row[1:] for row in diff_manifests(a, b)}
    assert fields["metric accuracy"] == ("0.9", "0.95")
    assert "content_hash" in fields
    assert diff_manifests(a, a) == []
