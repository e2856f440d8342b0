"""Encryption at rest: sealed at build, verifiable without the key, opened by the server with it.

The library takes the key as an argument; the CLI and the server read it from the environment (the settings
layer), which the tests at the end drive through the real command line."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from shipyard.artifact.encryption import generate_key, model_source
from shipyard.errors import IntegrityError, InvalidInputError, UnavailableError
from shipyard.pipeline import import_onnx
from shipyard.registry import LocalRegistry
from shipyard.registry import remote as remote_storage
from shipyard.settings import KEY_ENV, KEY_FILE_ENV, Environment
from tests._helpers import make_mlp_onnx
from tests.conftest import CliResult
from tests.serve.conftest import serve_until_exit, start_server, stop_server

X = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)


@pytest.fixture
def key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A key file, configured in the environment for the processes a test starts."""
    path = tmp_path / "keys" / "aes.key"
    generate_key(path)
    monkeypatch.setenv(KEY_FILE_ENV, str(path))
    monkeypatch.delenv(KEY_ENV, raising=False)
    return path


def _key(path: Path) -> bytes:
    key = Environment(key_file=path).encryption_key()
    assert key is not None
    return key


def _plain(model: Path) -> np.ndarray:
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]  # type: ignore[no-any-return]


def test_sealed_at_build_verifiable_without_the_key_and_opened_with_it(
    key_file: Path, registry: LocalRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_mlp_onnx(tmp_path / "mlp.onnx")
    manifest = import_onnx(source, "mlp", registry, encryption_key=_key(key_file))
    assert manifest.encryption is not None
    assert manifest.encryption["algorithm"] == "AES-256-GCM"
    stored = registry.path("mlp:1") / "model.onnx"
    assert source.read_bytes()[:64] not in stored.read_bytes()
    with pytest.raises(Exception, match=r"(?i)protobuf|load"):  # ONNX Runtime's own error: not a model
        ort.InferenceSession(str(stored), providers=["CPUExecutionProvider"])
    opened = model_source(registry.path("mlp:1"), manifest, _key(key_file))
    assert isinstance(opened, bytes)
    session = ort.InferenceSession(opened, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": X})[0], _plain(source), rtol=1e-6)
    registry.manifest("mlp:1", verify=True)  # hashes cover the ciphertext: no key needed to verify
    with pytest.raises(UnavailableError, match="is encrypted"):
        model_source(registry.path("mlp:1"), manifest, None)


def test_a_wrong_key_and_a_modified_file_are_refused(key_file: Path, registry: LocalRegistry, tmp_path: Path) -> None:
    manifest = import_onnx(make_mlp_onnx(tmp_path / "mlp.onnx"), "mlp", registry, encryption_key=_key(key_file))
    folder = registry.path("mlp:1")
    other = tmp_path / "other.key"
    generate_key(other)
    with pytest.raises(IntegrityError, match="was encrypted with key"):
        model_source(folder, manifest, _key(other))
    data = bytearray((folder / "model.onnx").read_bytes())
    data[-3] ^= 0x10
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="wrong key or modified file"):
        model_source(folder, manifest, _key(key_file))


@pytest.mark.parametrize("value", ["not base64!", base64.b64encode(b"short").decode()])
def test_malformed_keys_are_explained(value: str, monkeypatch: pytest.MonkeyPatch, registry: LocalRegistry,
                                      tmp_path: Path, cli: Callable[..., CliResult]) -> None:  # fmt: skip
    with pytest.raises(InvalidInputError, match="encryption key must be"):
        Environment(key_text=value).encryption_key()
    monkeypatch.setenv(KEY_ENV, value)
    result = cli("import", str(make_mlp_onnx(tmp_path / "mlp.onnx")), "--name", "mlp", "--registry", str(registry.root))
    assert result.code == 2
    assert "SHIPYARD_ENCRYPTION_KEY: the encryption key must be" in result.err
    assert registry.all_versions() == []


def test_archives_stay_encrypted_and_the_server_opens_them_with_the_key(
    key_file: Path, registry: LocalRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_mlp_onnx(tmp_path / "mlp.onnx")
    import_onnx(source, "mlp", registry, encryption_key=_key(key_file))
    uri = remote_storage.push(registry, "mlp:1", f"file://{tmp_path / 'remote'}/")
    served = LocalRegistry(tmp_path / "served")
    pulled = remote_storage.pull(served, uri)
    assert pulled.encryption is not None
    assert (served.path("mlp:1") / "model.onnx").read_bytes() == (registry.path("mlp:1") / "model.onnx").read_bytes()
    server = start_server(served, tmp_path / "server.log", "mlp")  # inherits the key from the environment
    try:
        body = {"inputs": [{"name": "x", "shape": [4, 16], "datatype": "FP32", "data": X.ravel().tolist()}]}
        reply = httpx.post(f"{server.base()}/v2/models/mlp/infer", json=body, timeout=10).json()
        got = np.asarray(reply["outputs"][0]["data"], dtype=np.float32).reshape(reply["outputs"][0]["shape"])
        np.testing.assert_allclose(got, _plain(source), rtol=1e-5, atol=1e-6)
    finally:
        stop_server(server)
    monkeypatch.delenv(KEY_FILE_ENV)
    keyless = serve_until_exit(served, "mlp")
    assert keyless.returncode == 9  # nothing it was asked for can be served: it says why and exits
    assert "is encrypted" in keyless.stderr
    assert "Traceback" not in keyless.stderr
