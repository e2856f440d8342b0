"""Schemathesis against the live server, driven by the Open Inference Protocol's own OpenAPI description.

Every operation of ../shared/specs/open-inference-rest.yaml gets generated requests (valid and invalid
bodies, random names and versions); the server must never answer 5xx and must still be ready after each one
(checked per request, so the result does not depend on which tests ran before).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, settings

from tests.serve.conftest import RunningServer

SPEC = Path(__file__).resolve().parents[4] / "shared" / "specs" / "open-inference-rest.yaml"
if not SPEC.is_file():
    pytest.skip("../shared/specs is not beside this checkout (CI checks that it is)", allow_module_level=True)
schemathesis = pytest.importorskip("schemathesis")

# The upstream file writes path templates as ${NAME}; OpenAPI's own syntax is {NAME}.
schema = schemathesis.openapi.from_dict(yaml.safe_load(SPEC.read_text().replace("${", "{")))


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: Any, server: RunningServer) -> None:
    if case.method.upper() == "POST":  # random names only reach 404: aim the generated bodies at a real model
        case.path_parameters = {"MODEL_NAME": "mlp", "MODEL_VERSION": "1"}
    response = case.call(base_url=server.base(), timeout=10)
    assert response.status_code < 500, (case.as_curl_command(), response.text)
    assert httpx.get(f"{server.base()}/v2/health/ready", timeout=10).status_code == 200, case.as_curl_command()


def test_every_operation_of_the_protocol_is_fuzzed() -> None:
    operations = {result.ok().label for result in schema.get_all_operations()}
    assert len(operations) > 5, operations  # the parametrized test above runs once per operation
