"""Authenticated serving: bearer tokens with scopes on REST and gRPC, rate limits, and TLS with a test CA."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from shipyard.registry import LocalRegistry
from shipyard.serve.policy.auth import add_token
from tests.serve.conftest import RunningServer, start_server, stop_server


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("auth") / "tokens.yaml"
    issued = {
        "reader": add_token(path, "reader", ["infer:mlp"]),
        "operator": add_token(path, "operator", ["admin", "infer:*"]),
    }
    return path, issued


@pytest.fixture(scope="module")
def secured(
    model_registry: LocalRegistry, tokens: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("log") / "server.log"
    running = start_server(model_registry, log, "mlp:1", "id_fp32",
                           extra_args=("--tokens", str(tokens[0]), "--allow-management"))  # fmt: skip
    yield running
    assert stop_server(running) == 0


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _infer_input() -> httpclient.InferInput:
    inp = httpclient.InferInput("x", [1, 16], "FP32")
    inp.set_data_from_numpy(np.ones((1, 16), np.float32))
    return inp


def test_the_token_file_keeps_only_digests(tokens: tuple[Path, dict[str, str]]) -> None:
    text = tokens[0].read_text()
    assert all(token not in text for token in tokens[1].values())
    assert (tokens[0].stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize(
    ("path", "method", "who", "status"),
    [
        ("/v2/health/ready", "GET", None, 200),  # probes need no secret
        ("/v2", "GET", None, 401),
        ("/v2/models/mlp/infer", "POST", None, 401),
        ("/v2/models/mlp/infer", "POST", "forged", 401),
        ("/v2/models/mlp", "GET", "reader", 200),
        ("/v2/models/id_fp32", "GET", "reader", 403),  # scope infer:mlp only
        ("/v2/repository/index", "POST", "reader", 403),
        ("/v2/repository/index", "POST", "operator", 200),
        ("/v2/models/id_fp32", "GET", "operator", 200),
    ],
)
def test_rest_answers_by_token_and_scope(
    secured: RunningServer, tokens: tuple[Path, dict[str, str]], path: str, method: str, who: str | None, status: int
) -> None:
    headers = {} if who is None else _bearer(tokens[1].get(who, "not-a-token"))
    response = httpx.request(method, f"{secured.base()}{path}", headers=headers, json={}, timeout=10)
    assert response.status_code == status, response.text
    if status in (401, 403):
        assert "error" in response.json()


def test_a_token_added_or_revoked_while_serving_counts_without_a_restart(
    secured: RunningServer, tokens: tuple[Path, dict[str, str]]
) -> None:
    path = tokens[0]
    before = path.read_text()
    late = add_token(path, "late", ["infer:mlp"])

    def status() -> int:
        return httpx.get(f"{secured.base()}/v2/models/mlp", headers=_bearer(late), timeout=10).status_code

    try:
        _until(lambda: status() == 200)  # the file is looked at once a second at most
    finally:
        path.write_text(before)  # revoked: the file as it was
    _until(lambda: status() == 401)
    path.write_text("tokens: [this is not a token file")  # a broken edit keeps the tokens read before
    try:
        time.sleep(1.2)
        headers = _bearer(tokens[1]["reader"])
        assert httpx.get(f"{secured.base()}/v2/models/mlp", headers=headers, timeout=10).status_code == 200
    finally:
        path.write_text(before)


def _until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_stock_clients_send_tokens_on_both_protocols(
    secured: RunningServer, tokens: tuple[Path, dict[str, str]]
) -> None:
    headers = _bearer(tokens[1]["reader"])
    http_result = httpclient.InferenceServerClient(secured.http_url).infer("mlp", [_infer_input()], headers=headers)
    assert http_result.as_numpy("logits") is not None
    grpc_client = grpcclient.InferenceServerClient(secured.grpc_url)
    grpc_input = grpcclient.InferInput("x", [1, 16], "FP32")
    grpc_input.set_data_from_numpy(np.ones((1, 16), np.float32))
    grpc_result = grpc_client.infer("mlp", [grpc_input], headers={"authorization": headers["Authorization"]})
    np.testing.assert_allclose(grpc_result.as_numpy("logits"), http_result.as_numpy("logits"), rtol=1e-6)
    with pytest.raises(Exception, match="missing credentials"):
        grpc_client.infer("mlp", [grpc_input])
    with pytest.raises(Exception, match="may not"):
        grpc_client.unload_model("mlp", headers={"authorization": headers["Authorization"]})
    assert grpc_client.is_model_ready("mlp", headers={"authorization": headers["Authorization"]})


def test_rate_limit_answers_429_and_spares_health(model_registry: LocalRegistry, tmp_path: Path) -> None:
    server = start_server(model_registry, tmp_path / "server.log", "mlp:1",
                          extra_args=("--rate-limit", "2", "--rate-burst", "5"))  # fmt: skip
    try:
        with httpx.Client(base_url=server.base(), timeout=10) as client:
            codes = [client.get("/v2/models/mlp").status_code for _ in range(20)]
            assert codes[:5] == [200] * 5
            assert codes.count(429) >= 12  # 2/s refill over a fraction of a second
            assert client.get("/v2/health/ready").status_code == 200
            refused = client.get("/v2/models/mlp")
            assert refused.status_code == 429
            assert "rate limit" in refused.json()["error"]
    finally:
        stop_server(server)


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for 127.0.0.1 signed by it (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shipyard test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return paths


def test_tls_on_both_protocols(model_registry: LocalRegistry, tmp_path: Path) -> None:
    ca, cert, key = _certificates(tmp_path)
    server = start_server(model_registry, tmp_path / "server.log", "mlp:1", ca=ca,
                          extra_args=("--tls-cert", str(cert), "--tls-key", str(key)))  # fmt: skip
    try:
        trusted = ssl.create_default_context(cafile=str(ca))
        assert httpx.get(f"{server.base()}/v2/models/mlp", verify=trusted).status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not spoken on the TLS port
            httpx.get(f"http://{server.http_url}/v2/models/mlp", timeout=5)
        client = grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(ca))
        grpc_input = grpcclient.InferInput("x", [1, 16], "FP32")
        grpc_input.set_data_from_numpy(np.ones((1, 16), np.float32))
        assert client.infer("mlp", [grpc_input]).as_numpy("logits").shape == (1, 4)
    finally:
        stop_server(server)
