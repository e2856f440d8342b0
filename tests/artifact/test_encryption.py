"""Encryption at rest: sealed at build, verifiable without the key, opened by the server with it.

The library takes the key as an argument; the CLI and the server read it from the environment (the settings
layer), which the tests at the end drive through the real command line."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from shipyard import onnxrt
from shipyard.artifact import encryption
from shipyard.artifact.encryption import generate_key, model_source
from shipyard.errors import IntegrityError, InvalidInputError, UnavailableError
from shipyard.onnxrt import session
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
    assert isinstance(opened.model, bytes)
    assert opened.side_files == {}
    session = ort.InferenceSession(opened.model, providers=["CPUExecutionProvider"])
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
    with pytest.raises(IntegrityError, match="wrong key, or a modified, truncated or reordered file"):
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


def test_chunks_cut_off_or_reordered_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encryption, "CHUNK", 1000)
    key = b"k" * 32
    path = tmp_path / "weights.bin"
    plain = np.random.default_rng(0).bytes(4500)  # five chunks, the last one short
    path.write_bytes(plain)
    encryption.seal(path, key)
    sealed = path.read_bytes()
    assert encryption.open_sealed(path, key) == plain
    header, piece = len(b"SHIPYARD-AESGCM2") + 8 + 4, 1000 + 16
    chunks = [sealed[header + i * piece : header + (i + 1) * piece] for i in range(5)]
    damaged = {
        "cut at a chunk boundary": sealed[: header + 3 * piece],
        "cut inside a chunk": sealed[:-7],
        "two chunks swapped": sealed[:header] + chunks[1] + chunks[0] + b"".join(chunks[2:]),
        "a chunk repeated": sealed[:header] + chunks[0] + chunks[0] + b"".join(chunks[2:]),
        "a byte changed": sealed[:-1] + bytes([sealed[-1] ^ 1]),
    }
    for data in damaged.values():
        path.write_bytes(data)
        with pytest.raises(IntegrityError, match="modified, truncated or reordered"):
            encryption.open_sealed(path, key)


def test_files_sealed_whole_by_earlier_versions_still_open(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key, path = b"k" * 32, tmp_path / "model.onnx"
    nonce = b"n" * 12
    path.write_bytes(b"SHIPYARD-AESGCM1" + nonce + AESGCM(key).encrypt(nonce, b"the model", b"model.onnx"))
    assert encryption.open_sealed(path, key) == b"the model"


def test_a_model_with_external_weights_is_sealed_whole_and_served_from_memory(
    key_file: Path, registry: LocalRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path of models over 2 GB (the single-file limit lowered here): graph and weight file are both
    sealed; opening them decrypts into memory and writes no plaintext."""
    monkeypatch.setattr(onnxrt, "_SINGLE_FILE_LIMIT", 10_000)
    monkeypatch.setattr(encryption, "CHUNK", 64 << 10)
    source = make_mlp_onnx(tmp_path / "mlp.onnx", sizes=(16, 256, 256, 4))  # 290 kB of weights: 5 chunks
    beside = tmp_path / "beside" / "mlp.onnx"  # as an exporter of a big model writes it
    beside.parent.mkdir()
    onnx.save_model(onnx.load(str(source)), str(beside), save_as_external_data=True, location="mlp.onnx.data")
    manifest = import_onnx(beside, "big", registry, encryption_key=_key(key_file))
    folder = registry.path("big:1")
    assert manifest.encryption is not None
    assert manifest.encryption["side_file"] == "model.onnx.data"
    for name in ("model.onnx", "model.onnx.data"):
        assert (folder / name).read_bytes().startswith(b"SHIPYARD-AESGCM2")
    registry.manifest("big:1", verify=True)
    before = sorted(p.name for p in folder.iterdir())
    opened = model_source(folder, manifest, _key(key_file))
    assert list(opened.side_files) == ["model.onnx.data"]
    got = session(opened.model, side_files=opened.side_files).run(None, {"x": X})[0]
    np.testing.assert_allclose(got, _plain(source), rtol=1e-5)
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing decrypted to disk
