"""A version that would not fit is refused before it is loaded, with the estimate and the room in the message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from shipyard import memory
from shipyard.registry import LocalRegistry
from tests._helpers import free_port
from tests.serve.conftest import start_server, stop_server


def _serve(registry: LocalRegistry, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "shipyard", "serve", *args, "--registry", str(registry.root),
           "--http-port", str(free_port()), "--grpc-port", "0", "--metrics-port", "0"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_a_version_over_the_memory_budget_is_refused_with_the_estimate(model_registry: LocalRegistry) -> None:
    folder = model_registry.path(model_registry.resolve("mlp:1"))
    needed = memory.estimate(folder, model_registry.manifest("mlp:1"), instances=1)
    assert needed > memory.WORKING_FLOOR  # weights on top of ONNX Runtime's working memory
    refused = _serve(model_registry, "mlp:1", "--memory-limit", "64Mi")
    assert refused.returncode != 0
    output = refused.stdout + refused.stderr
    assert f"mlp:1 needs about {memory.mib(needed)}" in output
    assert "more than the --memory-limit (64 MiB)" in output
    assert "Traceback" not in output


def test_a_version_within_the_budget_serves_and_a_bad_budget_is_a_usage_error(
    model_registry: LocalRegistry, tmp_path: Path
) -> None:
    server = start_server(model_registry, tmp_path / "server.log", "mlp:1", extra_args=("--memory-limit", "1Gi"))
    try:
        assert httpx.get(f"{server.base()}/v2/models/mlp/ready").status_code == 200
    finally:
        assert stop_server(server) == 0
    bad = _serve(model_registry, "mlp:1", "--memory-limit", "lots")
    assert bad.returncode == 2
    assert "--memory-limit 'lots' is not a quantity" in bad.stderr


def test_what_is_free_here_is_read_from_the_machine() -> None:
    room = memory.available()
    assert room is not None
    assert 0 < room < 1 << 50
