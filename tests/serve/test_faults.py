"""Faults and hostile input: malformed gRPC bytes, hostile names, expired tokens, kill -9 mid-load, a short soak."""

from __future__ import annotations

import datetime
import http.client
import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest

from shipyard.pipeline import import_onnx
from shipyard.registry import LocalRegistry
from shipyard.serve.policy.auth import AccessControl, TokenFileWatch, add_token
from tests._helpers import make_loop_onnx, make_slow_onnx
from tests.serve.conftest import Load, RunningServer, start_server, stop_server

X = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)


def test_malformed_grpc_messages_are_refused_and_the_server_lives(server: RunningServer) -> None:
    channel = grpc.insecure_channel(server.grpc_url)
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # raw bytes in and out
    rng = np.random.default_rng(0)
    codes = set()
    for size in (1, 7, 64, 1024, 65536):
        for _ in range(10):
            with pytest.raises(grpc.RpcError) as caught:
                infer(rng.bytes(size), timeout=10)
            codes.add(caught.value.code())
    # Bytes that do not parse are INVALID_ARGUMENT; bytes that happen to parse name no loaded model.
    assert codes <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
    assert grpc.StatusCode.INVALID_ARGUMENT in codes
    assert httpx.get(f"{server.base()}/v2/health/ready").status_code == 200
    channel.close()


GOOD = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}


@pytest.mark.parametrize(
    ("method", "path", "status", "says"),
    [
        # Sent as written (http.client does not resolve dot segments the way httpx does); the server's ASGI
        # path is percent-decoded, so an encoded slash becomes a separator and the path matches no route.
        ("GET", "/v2/models/..%2F..%2Fetc%2Fpasswd", 404, "no route"),
        ("POST", "/v2/models/../../etc/passwd/infer", 404, "no route"),
        ("POST", "/v2/models/mlp/versions/..%2F1/infer", 404, "no route"),
        # These reach the name and version handling with a valid body and the right method.
        ("POST", "/v2/models/mlp/versions/1%00/infer", 400, "model version must be a whole number"),
        ("GET", "/v2/models/%2e%2e/ready", 400, '"ready":false'),
        ("POST", "/v2/models/%2e%2e/infer", 404, "model '..' is not loaded"),
        ("GET", "/v2/models/" + "a" * 5000, 404, "is not loaded"),
    ],
)
def test_hostile_names_and_versions_are_plain_errors(
    server: RunningServer, method: str, path: str, status: int, says: str
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    body = json.dumps(GOOD).encode() if method == "POST" else None
    connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    assert response.status == status, text
    assert says in text
    assert "root:" not in text
    assert "Traceback" not in server.log.read_text()


def test_an_expired_token_is_refused(tmp_path: Path) -> None:
    from shipyard.errors import UnauthenticatedError

    path = tmp_path / "tokens.yaml"
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    old = add_token(path, "old", ["infer:*"], expires=past)
    fresh = add_token(path, "fresh", ["infer:*"], expires=past + datetime.timedelta(days=1))
    access = AccessControl(tokens=TokenFileWatch(path))
    with pytest.raises(UnauthenticatedError, match="expired"):
        access.check(f"Bearer {old}", "127.0.0.1", "infer", "mlp")
    access.check(f"Bearer {fresh}", "127.0.0.1", "infer", "mlp")


def _rss_mib(pid: int) -> float:
    fields = Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()
    return int(fields[0]) / 1024


def _expected(registry: LocalRegistry) -> list[np.ndarray]:
    session = ort.InferenceSession(str(registry.path("mlp:1") / "model.onnx"), providers=["CPUExecutionProvider"])
    return [session.run(None, {"x": X})[0]]


def test_short_soak_every_answer_correct_and_memory_flat(model_registry: LocalRegistry, tmp_path: Path) -> None:
    """Saturating load for a few seconds (bench/soak.py runs minutes): zero errors, zero wrong answers."""
    server = start_server(model_registry, tmp_path / "server.log", "mlp:1")
    try:
        with Load(server, _expected(model_registry), X) as load:
            time.sleep(2)
            warm = _rss_mib(server.process.pid)
            time.sleep(6)
        grown = _rss_mib(server.process.pid) - warm
    finally:
        stop_server(server)
    assert load.ok > 500
    assert (load.failed, load.wrong) == (0, 0)
    assert grown < 30, f"RSS grew {grown:.1f} MiB under load"


def test_kill_9_mid_load_then_restart_serves_the_same_answers(model_registry: LocalRegistry, tmp_path: Path) -> None:
    server = start_server(model_registry, tmp_path / "first.log", "mlp:1")
    with Load(server, _expected(model_registry), X) as load:
        time.sleep(1)
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
    assert load.ok > 0
    assert load.wrong == 0  # requests in flight failed (connection reset); none was answered wrongly
    model_registry.manifest("mlp:1", verify=True)  # the registry is untouched by the crash
    again = start_server(model_registry, tmp_path / "second.log", "mlp:1")
    try:
        with Load(again, _expected(model_registry), X) as after:
            time.sleep(1)
        assert after.ok > 0
        assert (after.failed, after.wrong) == (0, 0)
    finally:
        stop_server(again)


def test_request_timeout_and_element_limit(registry: LocalRegistry, tmp_path: Path) -> None:
    import_onnx(make_slow_onnx(tmp_path / "slow.onnx"), "slow", registry)
    server = start_server(registry, tmp_path / "server.log", "slow", max_body_mb=64,
                          extra_args=("--request-timeout", "0.001", "--max-elements", "4096"))  # fmt: skip
    try:
        one = {"inputs": [{"name": "x", "shape": [1, 1024], "datatype": "FP32", "data": [0.5] * 1024}]}
        late = httpx.post(f"{server.base()}/v2/models/slow/infer", json=one, timeout=30)
        assert late.status_code == 504, late.text
        assert "request timeout" in late.json()["error"]
        many = {"inputs": [{"name": "x", "shape": [8, 1024], "datatype": "FP32", "data": [0.5] * 8192}]}
        big = httpx.post(f"{server.base()}/v2/models/slow/infer", json=many, timeout=30)
        assert big.status_code == 413
        assert "limit is 4096" in big.json()["error"]
        assert httpx.get(f"{server.base()}/v2/health/ready").status_code == 200
    finally:
        stop_server(server)


def _read_response(conn: socket.socket) -> str:
    """One whole HTTP response: the server may send its head and its body in separate writes."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _content_length(data):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode()


def _content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_a_body_shorter_than_its_content_length_gets_408(model_registry: LocalRegistry, tmp_path: Path) -> None:
    """It used to hold the connection (and a slot) for as long as the client liked."""
    server = start_server(model_registry, tmp_path / "server.log", "mlp:1", extra_args=("--body-timeout", "1"))
    try:
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as conn:
            conn.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"inputs\": [")  # fmt: skip
            start = time.monotonic()
            answer = _read_response(conn)
            waited = time.monotonic() - start
        assert answer.startswith("HTTP/1.1 408"), answer
        assert "did not arrive within 1 s" in answer
        assert 0.5 < waited < 5, waited
        assert httpx.get(f"{server.base()}/v2/health/ready", timeout=10).status_code == 200
    finally:
        stop_server(server)


def test_a_model_whose_cost_a_request_sets_never_runs_on_the_event_loop(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    """An ONNX Loop whose trip count is an input is fast at warm-up; a request that asks for millions of turns
    must neither stall the server (health answers while it runs) nor outlive its timeout."""
    import_onnx(make_loop_onnx(tmp_path / "loop.onnx"), "loop", registry)
    running = start_server(registry, tmp_path / "s.log", "loop", extra_args=("--request-timeout", "1"))
    hostile = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0] * 4},
                          {"name": "n", "shape": [1], "datatype": "INT64", "data": [6_000_000]}]}  # fmt: skip
    try:
        assert "loaded loop:1" in running.log.read_text()
        assert "worker threads" in running.log.read_text().split("loaded loop:1")[1].splitlines()[0]
        with httpx.Client(base_url=running.base(), timeout=30) as probe, ThreadPoolExecutor(1) as pool:
            assert probe.get("/v2/health/ready").status_code == 200  # the connection is open before the test
            start = time.perf_counter()
            slow = pool.submit(httpx.post, f"{running.base()}/v2/models/loop/infer", json=hostile, timeout=30)
            probes = []
            while not slow.done() and len(probes) < 20:
                before = time.perf_counter()
                assert probe.get("/v2/health/ready").status_code == 200
                probes.append(time.perf_counter() - before)
                time.sleep(0.05)
            reply = slow.result()
            answered = time.perf_counter() - start
        assert reply.status_code == 504, reply.text
        assert answered < 2.0  # the 1 s timeout, not the run's 4 s
        assert len(probes) >= 5
        assert max(probes) < 0.1, probes
    finally:
        assert stop_server(running) == 0
