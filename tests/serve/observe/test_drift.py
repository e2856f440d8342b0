"""Drift monitoring: flat on in-distribution traffic, moving (and alert-worthy) on shifted inputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from shipyard.artifact.reference import REFERENCE_FILE
from shipyard.registry import LocalRegistry
from tests._helpers import build_evaluated_mlp
from tests.serve.conftest import RunningServer, start_server, stop_server


@pytest.fixture
def monitored(registry: LocalRegistry, tmp_path: Path) -> Iterator[RunningServer]:
    """A server sampling every request for drift; stopped at teardown whatever the test did."""
    build_evaluated_mlp(tmp_path, registry, samples=1000)
    assert (registry.path("mlp:1") / REFERENCE_FILE).is_file()
    server = start_server(registry, tmp_path / "server.log", "mlp", extra_args=("--drift-sample", "1"))
    yield server
    if server.process.poll() is None:
        stop_server(server)


def _send(server: RunningServer, batch: np.ndarray) -> None:
    body = {"inputs": [{"name": "x", "shape": list(batch.shape), "datatype": "FP32", "data": batch.ravel().tolist()}]}
    assert httpx.post(f"{server.base()}/v2/models/mlp/infer", json=body, timeout=10).status_code == 200


def _psi_metric(server: RunningServer) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    return {
        f"{s.labels['input']}/{s.labels['feature']}": s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "shipyard_input_drift_psi"
    }


def test_drift_stays_flat_in_distribution_and_moves_on_shifted_inputs(monitored: RunningServer) -> None:
    server = monitored
    try:
        fresh = np.random.default_rng(1).standard_normal((1000, 16)).astype(np.float32)  # same distribution
        for i in range(0, 1000, 50):
            _send(server, fresh[i : i + 50])
        calm = httpx.get(f"{server.base()}/v2/models/mlp/drift", timeout=10).json()
        assert calm["window_samples"] == 1000
        assert max(calm["inputs"]["x"]) < 0.1, calm
        assert calm["prediction_psi"] < 0.1
        shifted = fresh + 1.5  # every feature moves by 1.5 standard deviations
        for i in range(0, 1000, 50):
            _send(server, shifted[i : i + 50])
        drifted = httpx.get(f"{server.base()}/v2/models/mlp/drift", timeout=10).json()
        assert min(drifted["inputs"]["x"]) > 0.2, drifted
        metric = _psi_metric(server)
        assert len(metric) == 16
        assert min(metric.values()) > 0.2
    finally:
        stop_server(server)


@pytest.fixture
def promtool() -> str:
    """The promtool binary; the tests that need it skip before any server is started when it is missing."""
    import shutil

    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (scripts/fetch_promtool.sh puts it in .venv/bin)")
    return found


def test_drift_alert_fires_on_the_psi_the_server_measured(
    promtool: str, monitored: RunningServer, tmp_path: Path
) -> None:
    """Live PSI values (calm, then shifted traffic) replayed through the exported rules with promtool."""
    import subprocess

    import yaml

    from shipyard.operate.monitoring import export

    server = monitored
    rng = np.random.default_rng(2)
    try:
        readings = {}
        for label, shift in (("calm", 0.0), ("shifted", 1.5)):
            batch = rng.standard_normal((1000, 16)).astype(np.float32) + shift
            for i in range(0, 1000, 50):
                _send(server, batch[i : i + 50])
            readings[label] = round(max(_psi_metric(server).values()), 3)
    finally:
        stop_server(server)
    assert readings["calm"] < 0.1 < 0.2 < readings["shifted"], readings
    print(f"worst-feature PSI measured by the server: calm {readings['calm']}, shifted {readings['shifted']}")
    export(tmp_path / "monitoring")

    def case(psi: float, alerts: list[dict[str, object]]) -> dict[str, object]:
        series = 'shipyard_input_drift_psi{model="mlp",version="1",input="x",feature="0"}'
        window = 'shipyard_drift_window_samples{model="mlp",version="1"}'
        check = {"eval_time": "15m", "alertname": "ShipyardInputDrift", "exp_alerts": alerts}
        return {
            "interval": "1m",
            "alert_rule_test": [check],
            "input_series": [{"series": series, "values": f"{psi}x20"}, {"series": window, "values": "1000x20"}],
        }

    firing = {"exp_labels": {"severity": "ticket", "model": "mlp", "version": "1", "input": "x"},
              "exp_annotations": {"summary": f"mlp:1 input x drifted (PSI {readings['shifted']})"}}  # fmt: skip
    tests = {"rule_files": ["prometheus-rules.yaml"], "evaluation_interval": "1m",
             "tests": [case(readings["calm"], []), case(readings["shifted"], [firing])]}  # fmt: skip
    (tmp_path / "monitoring" / "drift-test.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", "drift-test.yaml"], cwd=tmp_path / "monitoring",
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_exported_rules_and_every_dashboard_query_pass_promtool(promtool: str, tmp_path: Path) -> None:
    import json
    import subprocess

    import yaml

    from shipyard.operate.monitoring import export

    board, rules = export(tmp_path)
    checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    panels = json.loads(board.read_text())["panels"]
    assert [p["title"] for p in panels][:2] == ["Requests per second", "Error ratio"]
    # Every panel query, parsed by Prometheus's own parser as a recording rule.
    recording = {"groups": [{"name": "panels", "rules": [
        {"record": f"shipyard:panel_{p['id']}", "expr": p["targets"][0]["expr"]} for p in panels]}]}  # fmt: skip
    (tmp_path / "panels.yaml").write_text(yaml.safe_dump(recording))
    parsed = subprocess.run([promtool, "check", "rules", str(tmp_path / "panels.yaml")], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr
    assert f"SUCCESS: {len(panels)} rules found" in parsed.stdout


def test_feedback_labels_give_an_online_metric(monitored: RunningServer) -> None:
    server = monitored
    x = np.random.default_rng(4).standard_normal((40, 16)).astype(np.float32)
    try:
        with httpx.Client(base_url=server.base(), timeout=10) as client:
            predicted = []
            for i, row in enumerate(x):
                body = {"id": f"req-{i}", "inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                                       "data": row.tolist()}]}  # fmt: skip
                reply = client.post("/v2/models/mlp/infer", json=body).json()
                assert reply["id"] == f"req-{i}"
                predicted.append(int(np.argmax(reply["outputs"][0]["data"])))
            # 30 labels agree with the model, 10 do not: online accuracy 0.75 against 1.0 at build.
            items = [{"id": f"req-{i}", "label": p if i < 30 else (p + 1) % 4} for i, p in enumerate(predicted)]
            spoiled = client.post("/v2/models/mlp/feedback", json={"items": [*items, {"id": "nope", "label": 1}]})
            assert spoiled.status_code == 404  # one unknown id: nothing of the batch is counted
            scored = client.post("/v2/models/mlp/feedback", json={"items": items}).json()
            assert (scored["metric"], scored["scored"]) == ("accuracy", 40)
            assert scored["versions"] == [{"version": "1", "scored": 40, "online": 0.75, "count": 40, "build": 1.0}]
            again = client.post("/v2/models/mlp/feedback", json={"id": "req-0", "label": 1})
            assert again.status_code == 404  # each prediction is scored once
            bad = client.post("/v2/models/mlp/feedback", json={"items": [{"label": 1}]})
            assert bad.status_code == 400
            text = client.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    finally:
        stop_server(server)
    assert 'shipyard_online_metric{metric="accuracy",model="mlp",version="1"} 0.75' in text
    assert 'shipyard_feedback_total{metric="accuracy",model="mlp",version="1"} 40.0' in text


def test_exported_files_are_well_formed_without_promtool(tmp_path: Path) -> None:
    """The check that runs everywhere: rule-file structure and every panel query on an exported metric."""
    import json

    import yaml

    from shipyard.operate.monitoring import export

    board, rules = export(tmp_path)
    (group,) = yaml.safe_load(rules.read_text())["groups"]
    assert len(group["rules"]) == 7
    for rule in group["rules"]:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("page", "ticket")
        assert "shipyard_" in rule["expr"]
        assert rule["annotations"]["summary"]
    for panel in json.loads(board.read_text())["panels"]:
        assert "shipyard_" in panel["targets"][0]["expr"], panel["title"]


def test_feedback_under_a_canary_is_scored_by_the_version_that_answered(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    for folder in (tmp_path / "a", tmp_path / "b"):
        folder.mkdir()
        build_evaluated_mlp(folder, registry, samples=200)
    server = start_server(registry, tmp_path / "server.log", "mlp:1", "mlp:2", extra_args=("--canary", "mlp:2=50"))
    x = np.random.default_rng(5).standard_normal((40, 16)).astype(np.float32)
    try:
        with httpx.Client(base_url=server.base(), timeout=10) as client:
            answered: dict[str, int] = {}
            items = []
            for i, row in enumerate(x):
                body = {"id": f"r{i}", "inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                                   "data": row.tolist()}]}  # fmt: skip
                reply = client.post("/v2/models/mlp/infer", json=body).json()
                answered[reply["model_version"]] = answered.get(reply["model_version"], 0) + 1
                items.append({"id": f"r{i}", "label": int(np.argmax(reply["outputs"][0]["data"]))})
            scored = client.post("/v2/models/mlp/feedback", json={"items": items})
    finally:
        stop_server(server)
    assert set(answered) == {"1", "2"}, answered  # Binomial(40, 0.5) gives both, but for 2 in 10^12
    assert scored.status_code == 200, scored.text
    body = scored.json()
    assert body["scored"] == 40
    assert {v["version"]: v["scored"] for v in body["versions"]} == answered
    assert all(v["online"] == 1.0 for v in body["versions"])  # the labels are each version's own predictions
