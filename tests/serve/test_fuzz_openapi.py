"""Schemathesis against the live server, driven by the Open Inference Protocol's own OpenAPI description.

Every operation of ../shared/specs/open-inference-rest.yaml gets generated requests (valid and invalid
bodies, random names and versions); the server must never answer 5xx and must stay healthy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, settings

from tests.serve.conftest import RunningServer

SPEC = Path(__file__).resolve().parents[3] / "shared" / "specs" / "open-inference-rest.yaml"
if not SPEC.is_file():
    pytest.skip("../shared/specs is not beside this checkout (CI checks that it is)", allow_module_level=True)
schemathesis = pytest.importorskip("schemathesis")

# The upstream file writes path templates as ${NAME}; OpenAPI's own syntax is {NAME}.
schema = schemathesis.openapi.from_dict(yaml.safe_load(SPEC.read_text().replace("${", "{")))
TRIED: dict[str, int] = {}


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: Any, server: RunningServer) -> None:
    key = case.operation.label
    TRIED[key] = TRIED.get(key, 0) + 1
    if case.method.upper() == "POST":  # random names only reach 404: aim the generated bodies at a real model
        case.path_parameters = {"MODEL_NAME": "mlp", "MODEL_VERSION": "1"}
    response = case.call(base_url=server.base(), timeout=10)
    assert response.status_code < 500, (case.as_curl_command(), response.text)


def test_server_is_healthy_after_the_fuzzing(server: RunningServer) -> None:
    assert httpx.get(f"{server.base()}/v2/health/ready").status_code == 200
    assert sum(TRIED.values()) >= len(TRIED) > 5  # every operation was exercised, several times
    print(f"schemathesis sent {sum(TRIED.values())} requests over {len(TRIED)} operations: no 5xx")
