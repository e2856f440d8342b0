"""Canary weights and shadow versions inside the server, observed through stock clients and /metrics."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from shipyard.errors import InvalidInputError
from shipyard.registry import LocalRegistry
from shipyard.serve.policy.rollout import parse_rules
from tests.serve.conftest import start_server, stop_server

X = np.random.default_rng(3).standard_normal((1, 16)).astype(np.float32)
BODY = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": X.ravel().tolist()}]}


def _reference(registry: LocalRegistry, ref: str) -> np.ndarray:
    session = ort.InferenceSession(str(registry.path(ref) / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": X})[0]  # type: ignore[no-any-return]


def test_canary_shares_are_within_statistical_bounds(model_registry: LocalRegistry, tmp_path: Path) -> None:
    server = start_server(model_registry, tmp_path / "server.log", "mlp:1", "mlp:2",
                          extra_args=("--canary", "mlp:2=20"))  # fmt: skip
    try:
        versions = []
        with httpx.Client(base_url=server.base(), timeout=10) as client:
            for _ in range(600):
                reply = client.post("/v2/models/mlp/infer", json=BODY).json()
                versions.append(reply["model_version"])
            pinned = {client.post("/v2/models/mlp/versions/1/infer", json=BODY).json()["model_version"]
                      for _ in range(20)}  # fmt: skip
    finally:
        stop_server(server)
    canary = versions.count("2")
    # Binomial(600, 0.2): mean 120, sd 9.8; four standard deviations either way.
    assert 81 <= canary <= 159, canary
    assert set(versions) == {"1", "2"}
    assert pinned == {"1"}  # a request that names its version is never rerouted


def test_a_shadow_sees_traffic_but_never_changes_an_answer(model_registry: LocalRegistry, tmp_path: Path) -> None:
    v1, v2 = _reference(model_registry, "mlp:1"), _reference(model_registry, "mlp:2")
    assert not np.allclose(v1, v2)
    server = start_server(model_registry, tmp_path / "server.log", "mlp:1", "mlp:2",
                          extra_args=("--shadow", "mlp:2=100"))  # fmt: skip
    try:
        with httpx.Client(base_url=server.base(), timeout=10) as client:
            # Versionless requests go to the primary (the newest version that is not a shadow), never to the
            # shadow, although it is the newest loaded version.
            for i in range(50):
                path = "/v2/models/mlp/infer" if i % 2 else "/v2/models/mlp/versions/1/infer"
                reply = client.post(path, json=BODY).json()
                assert reply["model_version"] == "1", reply
                got = np.asarray(reply["outputs"][0]["data"], dtype=np.float32).reshape(v1.shape)
                np.testing.assert_allclose(got, v1, rtol=1e-5, atol=1e-6)
            deadline, counts = time.monotonic() + 10, {}
            while time.monotonic() < deadline:
                counts = _shadow_counts(client.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text)
                if sum(counts.values()) >= 50:
                    break
                time.sleep(0.1)
        direct = httpx.post(f"{server.base()}/v2/models/mlp/versions/2/infer", json=BODY, timeout=10).json()
    finally:
        stop_server(server)
    assert counts["disagree"] + counts["skipped"] == 50  # v2 differs from v1 on every mirrored request
    assert counts["agree"] == counts["error"] == 0
    assert direct["model_version"] == "2"  # naming the shadow's version queries it directly


def _shadow_counts(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "shipyard_shadow_requests_total" and sample.labels["version"] == "2"
    }


@pytest.mark.parametrize(
    ("rules", "message"),
    [(["mlp=10"], "NAME:VERSION=PERCENT"), (["mlp:2=0"], "must be in"), (["mlp:2=60", "mlp:3=50"], "more than 100")],
)
def test_bad_rules_are_explained(rules: list[str], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_rules(rules, "canary")
