"""plan / apply / rollback round trips, the local service, and the Docker entrypoint run as written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton_http

from shipyard.deploy.apply import apply, local_service, plan, rollback, status
from shipyard.errors import ConflictError, UnavailableError
from shipyard.pipeline import import_onnx
from shipyard.registry import LocalRegistry
from tests._helpers import free_port, make_mlp_onnx
from tests.deploy.conftest import Project


def _infer(port: int, model: str = "mlp") -> np.ndarray:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{port}")
    x = np.ones((1, 16), dtype=np.float32)
    request = triton_http.InferInput("x", list(x.shape), "FP32")
    request.set_data_from_numpy(x, binary_data=True)
    result = client.infer(model, [request]).as_numpy("logits")
    assert result is not None
    return result


def _wait_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the entrypoint's server did not become ready (exit code {process.poll()})")


def test_apply_is_idempotent_and_rollback_returns_to_an_earlier_release(
    project: Project, registry: LocalRegistry, tmp_path: Path
) -> None:
    out = tmp_path / "project" / "deploy"
    loaded = project()
    first = apply(loaded, registry, "docker")
    assert first.release is not None
    assert first.release.number == 1
    again = apply(loaded, registry, "docker")
    assert again.release is None, [line for change in again.plan.changes for line in change.diff]
    assert again.plan.empty
    # A new model version and a changed port: the plan names both, apply makes release 2.
    import_onnx(make_mlp_onnx(tmp_path / "mlp2.onnx", seed=5), "mlp", registry)
    changed = project(ports={"http": 9100, "grpc": 9101, "metrics": 9102})
    pending = plan(changed, registry, "docker")
    assert pending.models == [("mlp", "1", "2")]
    assert [c.path for c in pending.changes] == ["docker/Dockerfile"]
    assert any("EXPOSE 9100 9101 9102" in line for line in pending.changes[0].diff)
    second = apply(changed, registry, "docker")
    assert second.release is not None
    assert second.release.number == 2
    assert (out / "docker" / "archives" / "mlp-2.shipyard.tar.gz").is_file()
    assert "EXPOSE 9100" in (out / "docker" / "Dockerfile").read_text()
    # Back to release 1: recorded as release 3, files and models as they were.
    back = rollback(changed, registry, None, "docker")
    assert back.release is not None
    assert (back.release.number, back.release.rollback_of) == (3, 1)
    assert [m.version for m in back.release.models] == [1]
    assert (out / "docker" / "Dockerfile").read_text() == first_dockerfile(tmp_path, 1)
    # The spec still asks for release 2's state: plan says so.
    assert not plan(changed, registry, "docker").empty
    assert status(changed)["releases"] == {"docker": 3}


def first_dockerfile(tmp_path: Path, number: int) -> str:
    return (tmp_path / "project" / ".shipyard" / "releases" / "mlp" / "docker" / str(number) / "files" / "docker"
            / "Dockerfile").read_text()  # fmt: skip


def test_rollback_without_an_earlier_release_is_refused(project: Project, registry: LocalRegistry) -> None:
    loaded = project()
    apply(loaded, registry, "docker")
    with pytest.raises(ConflictError, match="nothing to roll back to"):  # a state conflict (exit 4), as for aliases
        rollback(loaded, registry, None, "docker")


def test_local_service_starts_answers_and_stops(project: Project, registry: LocalRegistry) -> None:
    loaded = project()
    outcome = apply(loaded, registry)  # deploy.target defaults to local
    try:
        assert outcome.service is not None
        port = outcome.service.http_port
        assert _infer(port).shape == (1, 4)
        state = status(loaded)["local"]
        assert isinstance(state, dict)
        assert state["ready"] is True
        assert state["models"] == ["mlp:1"]
        assert apply(loaded, registry).release is None  # running the same release: nothing to do
        # The supervisor brings a killed server back.
        server = int(subprocess.run(["pgrep", "-P", str(outcome.service.supervisor_pid)], capture_output=True,
                                    text=True, check=True).stdout.split()[0])  # fmt: skip
        os.kill(server, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not local_service(loaded).ready(outcome.service):
            time.sleep(0.2)
        assert _infer(port).shape == (1, 4)
    finally:
        stopped = local_service(loaded).stop()
    assert stopped is not None
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1)
    assert status(loaded)["local"] is None


def test_a_release_that_cannot_start_is_not_recorded(project: Project, registry: LocalRegistry) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        loaded = project(ports={"http": port, "grpc": free_port(), "metrics": free_port()})
        with pytest.raises(UnavailableError, match="did not become ready"):
            apply(loaded, registry)
    assert status(loaded) == {"local": None, "releases": {}}


def test_a_port_answered_by_another_server_is_an_error_not_ready(project: Project, registry: LocalRegistry) -> None:
    """Another HTTP server on the port answers every probe with 200; readiness is our own server's report."""
    import http.server
    import threading

    class Yes(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Yes)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        loaded = project(ports={"http": other.server_port, "grpc": free_port(), "metrics": free_port()})
        with pytest.raises(UnavailableError, match=r"did not become ready(.|\n)*cannot listen on 127\.0\.0\.1"):
            apply(loaded, registry)
        assert status(loaded) == {"local": None, "releases": {}}
    finally:
        other.shutdown()
        other.server_close()


def test_an_orphan_left_by_a_killed_supervisor_is_reported_and_stopped(
    project: Project, registry: LocalRegistry
) -> None:
    loaded = project()
    outcome = apply(loaded, registry)
    assert outcome.service is not None
    port = outcome.service.http_port
    try:
        os.kill(outcome.service.supervisor_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and local_service(loaded).supervised(outcome.service):
            time.sleep(0.05)
        state = status(loaded)["local"]
        assert isinstance(state, dict)
        assert (state["supervised"], state["ready"]) == (False, True)  # the orphan is ours and still answers
        assert _infer(port).shape == (1, 4)
    finally:
        stopped = local_service(loaded).stop()
    assert stopped is not None  # not "the local service was not running"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1)
    assert status(loaded)["local"] is None


def test_docker_entrypoint_serves_when_run_as_written(
    project: Project, registry: LocalRegistry, tmp_path: Path
) -> None:
    """The image's steps without an engine: its ENV, its `RUN shipyard pull` lines, then ENTRYPOINT + CMD."""
    from dockerfile_parse import DockerfileParser

    apply(project(), registry, "docker")
    context = tmp_path / "project" / "deploy" / "docker"
    parser = DockerfileParser(str(context / "Dockerfile"))
    env = {**os.environ, **parser.envs}
    # Where the container has its own filesystem, the test has folders of its own:
    env.update(SHIPYARD_REGISTRY=str(tmp_path / "image-registry"), SHIPYARD_HOST="127.0.0.1",
               SHIPYARD_HTTP_PORT=str(free_port()), SHIPYARD_GRPC_PORT=str(free_port()),
               SHIPYARD_METRICS_PORT=str(free_port()))  # fmt: skip
    copy = next(
        i["value"].split() for i in parser.structure if i["instruction"] == "COPY" and "archives/" in i["value"]
    )
    container_archives = copy[-1].rstrip("/")
    for step in parser.structure:
        if step["instruction"] == "RUN" and step["value"].startswith("shipyard pull"):
            argv = step["value"].replace(container_archives, str(context / "archives")).split()
            subprocess.run(argv, env=env, check=True, capture_output=True)
    argv = json.loads(next(i["value"] for i in parser.structure if i["instruction"] == "ENTRYPOINT"))
    argv += json.loads(next(i["value"] for i in parser.structure if i["instruction"] == "CMD"))
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = int(env["SHIPYARD_HTTP_PORT"])
        _wait_ready(port, server)
        model = registry.path("mlp:1") / "model.onnx"
        x = np.ones((1, 16), dtype=np.float32)
        expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(_infer(port), expected, rtol=1e-5, atol=1e-6)
    finally:
        server.terminate()
        server.wait(timeout=30)
