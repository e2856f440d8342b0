"""The map holds: the serve package stands apart from the build pipeline, settings come from one layer,
and every REST route is declared once with the access it needs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import shipyard
from shipyard.serve.transports.rest import ROUTES

PACKAGE = Path(shipyard.__file__).parent


def test_the_server_imports_without_the_build_pipeline_or_torch() -> None:
    code = (
        "import sys, shipyard.serve.app, shipyard.serve.server\n"
        "bad = sorted(m for m in sys.modules if m.startswith('shipyard.pipeline') or m.split('.')[0] == 'torch')\n"
        "print(bad)"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_only_the_settings_layer_reads_the_environment() -> None:
    reads = re.compile(r"os\.environ|os\.getenv|getenv\(")
    offenders = [
        f"{path.relative_to(PACKAGE)}:{number}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "settings.py" or path.parent != PACKAGE
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if reads.search(line) and not line.lstrip().startswith('"')  # rendered container text is not a read
    ]
    assert offenders == []


def test_every_route_is_declared_once_with_an_access_action() -> None:
    keys = [(r.method, r.path) for r in ROUTES]
    assert len(keys) == len(set(keys))
    for route in ROUTES:
        assert route.action in {"health", "metadata", "read", "infer", "index", "admin"}, route
        # Anything that changes state or runs a model needs more than read scope.
        if route.method == "POST":
            assert route.action in {"infer", "index", "admin"}, route
        assert route.path.startswith(("/v2", "/v1/")), route  # the protocol's routes, and OpenAI's
    assert {r.path for r in ROUTES if r.action == "admin"} == {
        "/v2/repository/models/{name}/load",
        "/v2/repository/models/{name}/unload",
    }
