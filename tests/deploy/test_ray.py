"""The rendered Ray Serve config runs on a real local Ray cluster (127.0.0.1): V2 answers, and it scales out."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton_http
import yaml

from shipyard.deploy.releases import render
from shipyard.registry import LocalRegistry
from tests._helpers import free_port
from tests.deploy.conftest import Project

pytest.importorskip("ray.serve")


@pytest.fixture
def ray_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A local Ray cluster on loopback with Serve's HTTP proxy on a free port; shut down afterwards."""
    import ray
    from ray import serve

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps Ray's own ports on 127.0.0.1
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # Replicas report their load every half second so that the scale-out below happens within seconds.
    monkeypatch.setenv("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    monkeypatch.setenv("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp,
             log_to_driver=False, _node_ip_address="127.0.0.1")  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _infer(port: int, x: np.ndarray) -> np.ndarray:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=30)
    request = triton_http.InferInput("x", list(x.shape), "FP32")
    request.set_data_from_numpy(x, binary_data=True)
    result = client.infer("mlp", [request]).as_numpy("logits")
    assert result is not None
    return result


@pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")
def test_ray_serve_answers_v2_and_scales_out(
    project: Project, registry: LocalRegistry, ray_cluster: int, tmp_path: Path
) -> None:
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from shipyard.deploy.ray_app import build_app

    loaded = project(min_replicas=1, max_replicas=2, target_ongoing_requests=1, resources={"cpu": "500m"})
    config = yaml.safe_load(render(loaded, registry, "ray").files["ray/serve_config.yaml"])
    ServeDeploySchema.model_validate(config)  # Ray's own schema for `serve deploy` files
    (app,) = config["applications"]
    assert app["import_path"] == "shipyard.deploy.ray_app:build_app"
    args = app["args"]
    # React within seconds here (Ray's defaults wait ~30 s); metrics_interval_s must stay below the look-back.
    args["autoscaling"].update(upscale_delay_s=1, look_back_period_s=2, metrics_interval_s=0.5)
    serve.run(build_app(args), name=app["name"], route_prefix=app["route_prefix"])

    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    model = registry.path("mlp:1") / "model.onnx"
    expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(_infer(ray_cluster, x), expected, rtol=1e-5, atol=1e-6)

    # Eight clients keep ~8 requests in flight against a target of 1 per replica: Serve adds a replica.
    stop, errors = threading.Event(), []

    def load() -> None:
        while not stop.is_set():
            try:
                _infer(ray_cluster, x)
            except Exception as exc:  # counted: a scale-out must not fail requests
                errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    replicas = 1
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and replicas < 2:
            time.sleep(1)
            status = serve.status().applications[app["name"]].deployments["shipyard"]
            replicas = sum(status.replica_states.values())
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert replicas >= 2
    assert errors == []
