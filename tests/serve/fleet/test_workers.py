"""`shipyard serve --workers 2`: one server from the outside, two processes inside (serve/fleet)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from shipyard.pipeline import import_onnx
from shipyard.registry import LocalRegistry
from tests._helpers import build_evaluated_mlp, make_mlp_onnx
from tests.serve.conftest import RunningServer, perf_analyzer_binary, start_server, stop_server

ROW = np.random.default_rng(3).standard_normal((1, 16)).astype(np.float32)


def _body(version_id: str | None = None, row: np.ndarray = ROW) -> dict[str, object]:
    body: dict[str, object] = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": row[0].tolist()}]}
    if version_id is not None:
        body["id"] = version_id
    return body


def _successes(server: RunningServer) -> float:
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    samples = [s for f in text_string_to_metric_families(text) if f.name == "shipyard_inference_requests"
               for s in f.samples if s.labels.get("outcome") == "success"]  # fmt: skip
    return sum(s.value for s in samples)


def _workers(server: RunningServer) -> list[int]:
    """The worker processes' pids (the supervisor's children that run a server, not its resource tracker)."""
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _fresh_connections(url: str, count: int, body: dict[str, object], threads: int = 4) -> list[int]:
    """`count` POSTs, each on a new connection (the workers take connections, not requests); their statuses."""

    def one(_: int) -> int:
        return httpx.post(url, json=body, timeout=10).status_code

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(count)))


@pytest.fixture(scope="module")
def fleet_registry(tmp_path_factory: pytest.TempPathFactory) -> LocalRegistry:
    root = tmp_path_factory.mktemp("fleet")
    registry = LocalRegistry(root / "registry")
    build_evaluated_mlp(root, registry, samples=64)  # mlp:1 with drift references and an online metric
    import_onnx(make_mlp_onnx(root / "mlp2.onnx", seed=1), "mlp", registry)  # mlp:2, loaded on demand
    return registry


@pytest.fixture(scope="module")
def fleet(fleet_registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("fleet-log") / "server.log"
    running = start_server(fleet_registry, log, "mlp:1", extra_args=("--workers", "2", "--insecure-management",
                                                                     "--drift-sample", "1"))  # fmt: skip
    yield running
    if running.process.poll() is None:
        assert stop_server(running) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_statistics_and_metrics_count_every_request_once_across_workers(fleet: RunningServer) -> None:
    url = f"{fleet.base()}/v2/models/mlp/versions/1"
    before = httpx.get(f"{url}/stats").json()["model_stats"][0]["inference_stats"]["success"]["count"]
    workers = _workers(fleet)
    assert len(workers) == 2
    ticks = [_cpu_ticks(p) for p in workers]
    statuses = _fresh_connections(f"{url}/infer", 300, _body())
    grpc = grpcclient.InferenceServerClient(fleet.grpc_url)
    for _ in range(100):
        inp = grpcclient.InferInput("x", [1, 16], "FP32")
        inp.set_data_from_numpy(ROW)
        grpc.infer("mlp", [inp], model_version="1")
    assert statuses == [200] * 300
    assert all(_cpu_ticks(p) > t for p, t in zip(workers, ticks, strict=True))  # both workers answered some
    stats = httpx.get(f"{url}/stats").json()["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] - before == 400
    grpc_stats = grpc.get_inference_statistics("mlp", "1", as_json=True)["model_stats"][0]
    assert int(grpc_stats["inference_stats"]["success"]["count"]) == stats["inference_stats"]["success"]["count"]
    line = 'shipyard_inference_requests_total{model="mlp",outcome="success",version="1"} '
    scrapes = [httpx.get(f"http://127.0.0.1:{fleet.metrics_port}/metrics").text for _ in range(3)]
    values = {next(t for t in s.splitlines() if t.startswith(line)) for s in scrapes}
    assert values == {f"{line}{float(stats['inference_stats']['success']['count'])}"}  # one series, the sum


def test_a_version_loaded_or_unloaded_is_so_on_every_worker_when_acknowledged(fleet: RunningServer) -> None:
    base = fleet.base()
    assert httpx.post(f"{base}/v2/repository/models/mlp/load", json={"parameters": {"version": 2}}).status_code == 200
    assert _fresh_connections(f"{base}/v2/models/mlp/versions/2/infer", 200, _body()) == [200] * 200
    assert httpx.post(f"{base}/v2/repository/models/mlp/unload", json={"parameters": {"version": 2}}).status_code == 200
    assert _fresh_connections(f"{base}/v2/models/mlp/versions/2/infer", 200, _body()) == [404] * 200
    assert httpx.get(f"{base}/v2/health/ready").status_code == 200


def test_drift_and_feedback_add_up_what_every_worker_saw(fleet: RunningServer) -> None:
    base = fleet.base()
    rows = np.random.default_rng(5).standard_normal((60, 16)).astype(np.float32)
    window = httpx.get(f"{base}/v2/models/mlp/versions/1/drift").json()["window_samples"]

    def one(i: int) -> int:
        reply = httpx.post(f"{base}/v2/models/mlp/versions/1/infer", json=_body(f"w-{i}", rows[i : i + 1]), timeout=10)
        return int(np.argmax(reply.json()["outputs"][0]["data"]))

    with ThreadPoolExecutor(4) as pool:
        predicted = list(pool.map(one, range(60)))
    drift = httpx.get(f"{base}/v2/models/mlp/versions/1/drift").json()
    assert drift["window_samples"] == min(window + 60, 1000 * 2)  # --drift-sample 1: every request, both windows
    items = [{"id": f"w-{i}", "label": p if i < 45 else (p + 1) % 4} for i, p in enumerate(predicted)]
    scored = httpx.post(f"{base}/v2/models/mlp/versions/1/feedback", json={"items": items}).json()
    assert scored["scored"] == 60  # ids remembered by either worker, scored in one call
    assert scored["versions"][0]["online"] == pytest.approx(45 / 60)
    assert httpx.post(f"{base}/v2/models/mlp/feedback", json={"id": "w-0", "label": 1}).status_code == 404


def test_a_killed_worker_is_replaced_and_new_connections_are_not_lost(fleet: RunningServer) -> None:
    url = f"{fleet.base()}/v2/models/mlp/versions/1/infer"
    results: list[tuple[float, float, int | str]] = []  # (start, end, status or error)
    stop = threading.Event()

    def load() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            start = time.monotonic()
            try:
                outcome: int | str = httpx.post(url, json=_body(), timeout=10).status_code
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            results.append((start, time.monotonic(), outcome))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    counted = _successes(fleet)  # a scrape: what each worker had counted so far
    victim = _workers(fleet)[0]
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the replacement starts and loads; readiness is every worker's
        workers = _workers(fleet)
        if len(workers) == 2 and victim not in workers and httpx.get(f"{fleet.base()}/v2/health/ready").is_success:
            break
        time.sleep(0.1)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert victim not in _workers(fleet)
    assert len(_workers(fleet)) == 2
    after = [outcome for start, _, outcome in results if start > killed + 0.05]
    assert after
    assert [outcome for outcome in after if outcome != 200] == []  # nothing that had not reached it was lost
    assert all(end - start < 10 for start, end, _ in results)  # and nothing hung
    assert _successes(fleet) >= counted + len(after)  # the dead worker's counts stay in the sum: no reset
    metrics = httpx.get(f"http://127.0.0.1:{fleet.metrics_port}/metrics").text
    assert "shipyard_worker_restarts_total 1.0" in metrics
    assert "died (exit -9); starting a replacement" in fleet.log.read_text()


def test_perf_analyzer_on_both_protocols(fleet: RunningServer, tmp_path: Path) -> None:
    tool = perf_analyzer_binary()
    for protocol, url in (("http", fleet.http_url), ("grpc", fleet.grpc_url)):
        run = subprocess.run(
            [tool, "-m", "mlp", "-x", "1", "-u", url, "-i", protocol, "--concurrency-range", "4:4",
             "--measurement-interval", "1000", "--stability-percentage", "1000", "--max-trials", "3",
             "-f", str(tmp_path / f"{protocol}.csv")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Inferences/Second" in (tmp_path / f"{protocol}.csv").read_text()


def test_sigterm_drains_every_worker(fleet_registry: LocalRegistry, tmp_path: Path) -> None:
    server = start_server(fleet_registry, tmp_path / "log", "mlp:1", extra_args=("--workers", "2"))
    try:
        workers = _workers(server)
    finally:
        code = stop_server(server)
    assert len(workers) == 2
    assert code == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert "Traceback" not in server.log.read_text()


def test_a_rate_limit_holds_across_workers(fleet_registry: LocalRegistry, tmp_path: Path) -> None:
    server = start_server(fleet_registry, tmp_path / "log", "mlp:1",
                          extra_args=("--workers", "2", "--rate-limit", "1", "--rate-burst", "10"))  # fmt: skip
    try:
        workers = _workers(server)
        ticks = [_cpu_ticks(p) for p in workers]
        start = time.monotonic()
        statuses = _fresh_connections(f"{server.base()}/v2/models/mlp/versions/1/infer", 100, _body())
        elapsed = time.monotonic() - start
        assert all(_cpu_ticks(p) > t for p, t in zip(workers, ticks, strict=True))
    finally:
        stop_server(server)
    assert set(statuses) == {200, 429}
    # One bucket for the caller, whichever worker answers: a bucket per worker would let 2 x 10 through.
    assert statuses.count(200) <= 10 + elapsed * 1 + 1


def _versionless(server: RunningServer, count: int) -> list[str]:
    """The version that answered each of `count` versionless requests (fresh connections: both workers)."""

    def version(_: int) -> str:
        reply = httpx.post(f"{server.base()}/v2/models/mlp/infer", json=_body(), timeout=10)
        return str(reply.json()["model_version"])

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(version, range(count)))


@pytest.mark.parametrize("rule", ["--canary", "--shadow"])
def test_canary_and_shadow_shares_hold_across_workers(rule: str, fleet_registry: LocalRegistry, tmp_path: Path) -> None:
    # --canary mlp:1=30: 30 % of versionless requests answered by version 1 instead of 2 (the newest);
    # --shadow mlp:2=30: all answered by 1, 30 % mirrored to 2, counted by outcome in /metrics.
    target = "mlp:1=30" if rule == "--canary" else "mlp:2=30"
    server = start_server(
        fleet_registry, tmp_path / "log", "mlp:1", "mlp:2", extra_args=("--workers", "2", rule, target)
    )
    try:
        versions = _versionless(server, 400)
        time.sleep(0.5)  # the last shadow copies finish
        metrics = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    finally:
        stop_server(server)
    # Each worker draws for its own requests: 30 % of each is 30 % of the whole (one draw's sd: 2.3 %).
    if rule == "--canary":
        assert 0.2 < versions.count("1") / 400 < 0.4
        return
    assert set(versions) == {"1"}
    mirrored = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith('shipyard_shadow_requests_total{model="mlp"'))  # fmt: skip
    assert 0.2 < mirrored / 400 < 0.4  # both workers' counts, added up
