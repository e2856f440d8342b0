"""Hot load/unload and version switches under a running load; metrics; graceful stop; perf_analyzer."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from shipyard.pipeline import import_onnx
from shipyard.registry import LocalRegistry
from tests._helpers import make_mlp_onnx, make_slow_onnx
from tests.conftest import CliResult
from tests.serve.conftest import (
    Load,
    RunningServer,
    perf_analyzer_binary,
    serve_until_exit,
    start_server,
    stop_server,
)


@pytest.fixture
def private_server(model_registry: LocalRegistry, tmp_path: Path) -> Iterator[RunningServer]:
    running = start_server(model_registry, tmp_path / "server.log", "mlp:1", extra_args=("--insecure-management",))
    yield running
    assert stop_server(running) == 0, running.log.read_text()


def _reference(registry: LocalRegistry, ref: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(registry.path(ref) / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]  # type: ignore[no-any-return]


def _repository(server: RunningServer, action: str, model: str, version: str | None = None) -> None:
    body = {"parameters": {"version": version}} if version else {}
    response = httpx.post(f"{server.base()}/v2/repository/models/{model}/{action}", json=body, timeout=60)
    assert response.status_code == 200, response.text


def test_version_switch_and_hot_load_under_load_lose_no_request(
    private_server: RunningServer, model_registry: LocalRegistry
) -> None:
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)
    v1, v2 = _reference(model_registry, "mlp:1", x), _reference(model_registry, "mlp:2", x)
    assert not np.allclose(v1, v2)
    with Load(private_server, [v1, v2], x) as load:
        load.wait_for(100)
        _repository(private_server, "load", "mlp", "2")  # new version takes new requests
        load.wait_for(load.sent + 100)
        _repository(private_server, "unload", "mlp", "1")  # old version drains, then goes
        load.wait_for(load.sent + 100)
        _repository(private_server, "load", "id_fp32")  # another model comes and goes meanwhile
        _repository(private_server, "unload", "id_fp32")
        load.wait_for(load.sent + 100)
    assert load.failed == 0, load.errors[:3]
    assert load.wrong == 0
    assert load.sent >= 400
    meta = httpx.get(f"{private_server.base()}/v2/models/mlp").json()
    assert meta["versions"] == ["2"]
    response = httpclient.InferenceServerClient(private_server.http_url)
    inp = httpclient.InferInput("x", [2, 16], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(response.infer("mlp", [inp]).as_numpy("logits"), v2, rtol=1e-5)


def test_counters_go_on_after_an_unload_and_a_reload(private_server: RunningServer) -> None:
    """Prometheus counters never go back within a process: a version loaded again resumes its figures."""
    series = 'shipyard_inference_requests_total{model="id_fp32",outcome="success",version="1"}'

    def count() -> float:
        text = httpx.get(f"http://127.0.0.1:{private_server.metrics_port}/metrics").text
        return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(series + " ")), 0.0)

    _repository(private_server, "load", "id_fp32")
    body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]}
    for _ in range(3):
        assert httpx.post(f"{private_server.base()}/v2/models/id_fp32/infer", json=body).status_code == 200
    before = count()
    assert before >= 3
    _repository(private_server, "unload", "id_fp32")
    _repository(private_server, "load", "id_fp32")
    assert count() == before
    assert httpx.post(f"{private_server.base()}/v2/models/id_fp32/infer", json=body).status_code == 200
    assert count() == before + 1


def test_grpc_repository_api(private_server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(private_server.grpc_url)
    client.load_model("id_int8")
    assert client.is_model_ready("id_int8")
    client.unload_model("id_int8")
    assert not client.is_model_ready("id_int8")
    with pytest.raises(Exception, match="no model named 'ghost'"):
        client.load_model("ghost")


def test_management_without_tokens_must_be_asked_for_as_insecure(
    model_registry: LocalRegistry, cli: Callable[..., CliResult]
) -> None:
    refused = cli("serve", "mlp:1", "--allow-management", "-r", str(model_registry.root))
    assert refused.code == 2
    assert "--allow-management without --tokens lets anyone who reaches the port load and unload" in refused.err
    assert "--insecure-management" in refused.err


def test_the_repository_api_is_off_unless_enabled(server: RunningServer) -> None:
    """The shared server runs with defaults: loading and unloading models over the network is refused."""
    response = httpx.post(f"{server.base()}/v2/repository/models/id_fp32/unload", timeout=10)
    assert response.status_code == 403
    assert "--allow-management" in response.json()["error"]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(Exception, match="disabled"):
        client.unload_model("id_fp32")
    assert client.is_model_ready("id_fp32")


def test_prometheus_metrics(private_server: RunningServer) -> None:
    client = httpclient.InferenceServerClient(private_server.http_url)
    inp = httpclient.InferInput("x", [3, 16], "FP32")
    inp.set_data_from_numpy(np.ones((3, 16), np.float32))
    for _ in range(5):
        client.infer("mlp", [inp])
    text = httpx.get(f"http://127.0.0.1:{private_server.metrics_port}/metrics").text
    assert 'shipyard_inference_requests_total{model="mlp",outcome="success",version="1"} 5.0' in text
    assert 'shipyard_batch_size_sum{model="mlp",version="1"}' in text
    assert 'shipyard_queue_depth{model="mlp",version="1"}' in text
    assert 'shipyard_request_duration_seconds_count{model="mlp",version="1"} 5.0' in text


def test_a_name_that_does_not_exist_stops_the_server_at_start(model_registry: LocalRegistry) -> None:
    run = serve_until_exit(model_registry, "mlp:1", "tinyresnet")
    assert run.returncode == 3, run.stderr
    assert "no model named 'tinyresnet'" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_version_that_cannot_load_is_reported_and_the_rest_serve(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    import_onnx(make_mlp_onnx(tmp_path / "a.onnx"), "mlp", registry)
    import_onnx(make_mlp_onnx(tmp_path / "b.onnx", seed=1), "other", registry)
    import_onnx(make_mlp_onnx(tmp_path / "c.onnx", seed=2), "spare", registry)  # registered, not asked for
    (registry.path("other:1") / "model.onnx").write_bytes(b"tampered")
    running = start_server(registry, tmp_path / "s.log", "mlp", "other")  # ready: it serves what it reports
    try:
        base = running.base()
        ok = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}]}
        assert httpx.post(f"{base}/v2/models/mlp/infer", json=ok).status_code == 200
        assert httpx.get(f"{base}/v2/models/other/ready").status_code == 400
        index = {m["name"]: m for m in httpx.post(f"{base}/v2/repository/index").json()}
        metrics = httpx.get(f"http://127.0.0.1:{running.metrics_port}/metrics").text
    finally:
        stop_server(running)
    assert 'model="mlp"' in metrics
    assert 'model="other"' not in metrics  # a version that failed to load leaves no series behind
    assert index["mlp"]["state"] == "READY"
    assert index["other"]["state"] == "UNAVAILABLE"
    assert "does not match its recorded sha256" in index["other"]["reason"]
    assert str(tmp_path) not in index["other"]["reason"]  # clients do not learn where the registry is
    assert (index["spare"]["state"], index["spare"]["reason"]) == (
        "UNAVAILABLE", "not loaded: registered, but not being served")  # fmt: skip


def test_loading_a_tampered_version_through_the_api_is_a_400_that_says_why(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    import_onnx(make_mlp_onnx(tmp_path / "a.onnx"), "mlp", registry)
    import_onnx(make_mlp_onnx(tmp_path / "b.onnx", seed=1), "mlp", registry)
    (registry.path("mlp:2") / "model.onnx").write_bytes(b"tampered")
    running = start_server(registry, tmp_path / "s.log", "mlp:1", extra_args=("--insecure-management",))
    try:
        for body in ({"parameters": {"version": None}}, {"parameters": {"version": 2}}, {}):
            reply = httpx.post(f"{running.base()}/v2/repository/models/mlp/load", json=body)
            assert reply.status_code == 400, reply.text
            assert reply.json()["error"] == (
                "mlp:2 cannot be loaded: models/mlp/2: model.onnx does not match its recorded sha256 (modified or "
                "corrupt)"
            )
        ok = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}]}
        assert httpx.post(f"{running.base()}/v2/models/mlp/infer", json=ok).json()["model_version"] == "1"
    finally:
        assert stop_server(running) == 0


def test_a_server_that_can_load_nothing_exits(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    import_onnx(make_mlp_onnx(tmp_path / "a.onnx"), "mlp", registry)
    (registry.path("mlp:1") / "model.onnx").write_bytes(b"tampered")
    run = serve_until_exit(registry, "mlp")
    assert run.returncode == 9, run.stderr
    assert "no model version could be loaded: mlp: " in run.stderr
    assert "Traceback" not in run.stderr


def test_perf_analyzer_smoke(private_server: RunningServer) -> None:
    """The standard load generator runs against both protocols (a short window; figures live in bench/)."""
    tool = perf_analyzer_binary()
    for protocol, url in (("http", private_server.http_url), ("grpc", private_server.grpc_url)):
        run = subprocess.run(
            [tool, "-m", "mlp", "-u", url, "-i", protocol, "--concurrency-range", "2:2",
             "--measurement-interval", "1000", "--stability-percentage", "1000", "--max-trials", "3"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Throughput:" in run.stdout


def test_taken_ports_are_a_clear_error(private_server: RunningServer) -> None:
    for flags, what in (
        (["--http-port", str(private_server.http_port)], "(REST)"),
        (["--grpc-port", str(private_server.grpc_port)], "(gRPC)"),
        (["--metrics-port", str(private_server.metrics_port)], "(metrics)"),
    ):
        ports = {"--http-port": "0", "--grpc-port": "0", "--metrics-port": "0"}
        ports[flags[0]] = flags[1]
        args = [a for pair in ports.items() for a in pair]
        run = subprocess.run(
            [sys.executable, "-m", "shipyard", "serve", "mlp:1", "-r", str(private_server.registry.root), *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 9, run.stderr
        assert f"cannot listen on 127.0.0.1:{flags[1]} {what}" in run.stderr
        assert "Traceback" not in run.stderr


def _queue_depth(client: httpx.Client, server: RunningServer, model: str) -> int:
    """Requests waiting in the model's batcher, from the server's Prometheus endpoint."""
    text = client.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    line = next(line for line in text.splitlines() if line.startswith(f'shipyard_queue_depth{{model="{model}"'))
    return int(float(line.rsplit(" ", 1)[1]))


def test_sigterm_drains_requests_in_flight(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    # ~0.1 s a request on one thread (25 ms per 48 layers measured here): six take ~0.6 s one after another,
    # so the polls below see them arrive while most are still queued or running.
    import_onnx(make_slow_onnx(tmp_path / "slow.onnx", layers=192), "slow", registry)
    running = start_server(registry, tmp_path / "server.log", "slow", max_body_mb=64)
    x = np.ones((64, 1024), np.float32)
    finished: list[tuple[float, int]] = []

    def call() -> None:
        client = httpclient.InferenceServerClient(running.http_url, network_timeout=60)
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        try:
            client.infer("slow", [inp])
            finished.append((time.monotonic(), 200))
        except Exception:
            finished.append((time.monotonic(), 0))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    arrived = done = 0
    try:
        with httpx.Client(timeout=10) as poll:
            while time.monotonic() < deadline:  # until the server holds all six: taken into a batch, or waiting
                stats = poll.get(f"{running.base()}/v2/models/slow/stats").json()["model_stats"][0]
                taken, done = stats["inference_stats"]["queue"]["count"], stats["inference_stats"]["success"]["count"]
                arrived = taken + _queue_depth(poll, running, "slow")
                if arrived >= 6:
                    break
                time.sleep(0.005)
    finally:  # the server is stopped (SIGTERM) whatever the polls saw
        sent_term = time.monotonic()
        code = stop_server(running)
    assert arrived == 6, f"only {arrived} of 6 requests reached the server in 30 s"
    assert done < 6, "every request finished before SIGTERM: nothing was in flight"
    assert code == 0
    for t in threads:
        t.join(timeout=60)
    assert [code for _, code in finished] == [200] * 6
    assert any(when > sent_term for when, _ in finished)  # some were still in flight at SIGTERM
