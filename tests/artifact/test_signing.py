"""Signatures (OpenSSF model-signing, EC keys): sign, verify, tamper, wrong key, and `serve --require-signed`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from shipyard.artifact.signing import SIGNATURE_FILE, generate_keys, sign, verify_signature
from shipyard.errors import IntegrityError, InvalidInputError
from shipyard.pipeline import import_onnx
from shipyard.registry import LocalRegistry
from shipyard.registry import remote as remote_storage
from tests._helpers import make_mlp_onnx
from tests.serve.conftest import start_server, stop_server

pytest.importorskip("model_signing")


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "keys" / "signing.pem", tmp_path / "keys" / "signing.pub.pem"
    generate_keys(private, public)
    return private, public


@pytest.fixture
def signed(registry: LocalRegistry, keys: tuple[Path, Path], tmp_path: Path) -> Path:
    import_onnx(make_mlp_onnx(tmp_path / "mlp.onnx"), "mlp", registry)
    folder = registry.path("mlp:1")
    sign(folder, keys[0])
    return folder


def test_a_signed_version_verifies_and_stays_a_valid_artifact(
    signed: Path, keys: tuple[Path, Path], registry: LocalRegistry
) -> None:
    assert (signed / SIGNATURE_FILE).is_file()
    verify_signature(signed, keys[1])
    registry.manifest("mlp:1", verify=True)  # the signature file is allowed beside the listed files
    assert (keys[0].stat().st_mode & 0o777) == 0o600


def test_tampering_a_file_breaks_the_signature(signed: Path, keys: tuple[Path, Path]) -> None:
    model = signed / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="signature check failed"):
        verify_signature(signed, keys[1])


def test_another_key_and_a_missing_signature_are_refused(signed: Path, tmp_path: Path) -> None:
    other_private, other_public = tmp_path / "other.pem", tmp_path / "other.pub.pem"
    generate_keys(other_private, other_public)
    with pytest.raises(IntegrityError, match="signature check failed"):
        verify_signature(signed, other_public)
    (signed / SIGNATURE_FILE).unlink()
    with pytest.raises(IntegrityError, match="is not signed"):
        verify_signature(signed, other_public)


def test_keys_are_never_overwritten(keys: tuple[Path, Path]) -> None:
    with pytest.raises(InvalidInputError, match="refusing to overwrite"):
        generate_keys(*keys)


def test_the_signature_travels_with_push_and_pull(
    signed: Path, keys: tuple[Path, Path], registry: LocalRegistry, tmp_path: Path
) -> None:
    uri = remote_storage.push(registry, "mlp:1", f"file://{tmp_path / 'remote'}/")
    other = LocalRegistry(tmp_path / "other")
    pulled = remote_storage.pull(other, uri)
    verify_signature(other.path(pulled.name + ":" + str(pulled.version)), keys[1])


def test_sign_and_verify_commands(signed: Path, keys: tuple[Path, Path], registry: LocalRegistry,
                                  cli: Callable[..., Any]) -> None:  # fmt: skip
    ok = cli("verify", "mlp:1", "--public-key", str(keys[1]), "--registry", str(registry.root))
    assert ok.code == 0, ok.err
    (signed / "model.onnx").write_bytes(b"replaced")
    bad = cli("verify", "mlp:1", "--public-key", str(keys[1]), "--registry", str(registry.root))
    assert bad.code == 7  # corrupt: the file hashes already fail before the signature is read
    assert "does not match its recorded sha256" in bad.err


def test_serve_require_signed_refuses_unsigned_versions_and_serves_the_rest(
    signed: Path, keys: tuple[Path, Path], registry: LocalRegistry, tmp_path: Path
) -> None:
    import_onnx(make_mlp_onnx(tmp_path / "other.onnx", seed=3), "unsigned", registry)
    # Ready (start_server waits for it): the server serves what it reports, and reports what it refused.
    server = start_server(registry, tmp_path / "server.log", "mlp", "unsigned",
                          extra_args=("--require-signed", "--public-key", str(keys[1])))  # fmt: skip
    try:
        base = server.base()
        assert httpx.get(f"{base}/v2/models/mlp/ready").status_code == 200
        assert httpx.get(f"{base}/v2/models/unsigned/ready").status_code == 400
        index = {m["name"]: m for m in httpx.post(f"{base}/v2/repository/index").json()}
    finally:
        stop_server(server)
    assert (index["mlp"]["state"], index["mlp"]["reason"]) == ("READY", "")
    assert index["unsigned"]["state"] == "UNAVAILABLE"
    assert "unsigned:1 is not signed" in index["unsigned"]["reason"]
    assert "unsigned:1 is not signed" in (tmp_path / "server.log").read_text()
