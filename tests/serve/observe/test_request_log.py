"""Sampled request logging (rotation, redaction) and `shipyard replay` catching a planted regression."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from shipyard.registry import LocalRegistry
from tests.serve.conftest import RunningServer, start_server, stop_server


def _traffic(server: RunningServer, count: int) -> None:
    rng = np.random.default_rng(5)
    with httpx.Client(base_url=server.base(), timeout=10) as client:
        for i in range(count):
            x = rng.standard_normal((2, 16)).astype(np.float32)
            body = {"id": f"r{i}", "inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32",
                                                "data": x.ravel().tolist()}]}  # fmt: skip
            assert client.post("/v2/models/mlp/versions/1/infer", json=body).status_code == 200


def test_logged_traffic_replays_and_a_planted_regression_is_reported(
    model_registry: LocalRegistry, tmp_path: Path, cli: Callable[..., Any]
) -> None:
    logs = tmp_path / "logs"
    args = ("--log-requests", str(logs), "--log-sample", "1", "--log-max-mb", "0.01")
    server = start_server(model_registry, tmp_path / "server.log", "mlp:1", extra_args=args)
    try:
        _traffic(server, 60)
    finally:
        stop_server(server)
    files = sorted(logs.glob("requests.jsonl*"))
    assert len(files) > 1  # rotated at 10 KB
    entries = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert len(entries) == 60
    assert {e["id"] for e in entries} == {f"r{i}" for i in range(60)}
    assert entries[0]["inputs"]["x"]["shape"] == [2, 16]
    reg = ("--registry", str(model_registry.root))
    same = cli("replay", *map(str, files), "--against", "mlp:1", *reg)
    assert same.code == 0, same.err
    assert "agreement 100.0%" in same.out
    regression = cli("replay", *map(str, files), "--against", "mlp:2", *reg)  # other weights: a regression
    assert regression.code == 6
    assert "agrees with the served answers on" in regression.err
    assert "agreement" in regression.out


def test_redacted_logs_keep_no_values(model_registry: LocalRegistry, tmp_path: Path, cli: Callable[..., Any]) -> None:
    logs = tmp_path / "logs"
    server = start_server(model_registry, tmp_path / "server.log", "mlp:1",
                          extra_args=("--log-requests", str(logs), "--log-sample", "1", "--log-redact"))  # fmt: skip
    try:
        _traffic(server, 5)
    finally:
        stop_server(server)
    (entry, *_) = [json.loads(line) for line in (logs / "requests.jsonl").read_text().splitlines()]
    assert entry["redacted"] is True
    assert "data" not in entry["inputs"]["x"]
    assert len(entry["inputs"]["x"]["sha256"]) == 64
    nothing = cli("replay", str(logs / "requests.jsonl"), "--against", "mlp:1", "--registry", str(model_registry.root))
    assert nothing.code == 2
    assert "5 redacted" in nothing.err
