"""The map holds: the serve package stands apart from the build pipeline, settings come from one layer,
the rooms import each other without circles, transports reach models only through the data plane, and every
REST route is declared once with the access it needs."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import shipyard
from shipyard.serve.transports.openai import OPENAI
from shipyard.serve.transports.v2 import V2

PACKAGE = Path(shipyard.__file__).parent
ROUTES = [*V2.routes, *OPENAI.routes]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(path): path for path in PACKAGE.rglob("*.py")}


def _imports(name: str) -> Iterator[str]:
    """Every shipyard module `name` imports, wherever the import stands (a function body, under
    TYPE_CHECKING): a deferred import still ties the two modules together."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in MODULES or base in MODULES:
                    yield full if full in MODULES else base


def _circle(room: str) -> list[str] | None:
    """A chain of imports inside `room` that leads back to where it started, if there is one."""
    graph = {m: sorted({i for i in _imports(m) if i.startswith(room) and i != m}) for m in MODULES if
             m.startswith(room)}  # fmt: skip
    done: set[str] = set()

    def walk(module: str, chain: list[str]) -> list[str] | None:
        if module in chain:
            return [*chain[chain.index(module) :], module]
        if module in done:
            return None
        for target in graph[module]:
            found = walk(target, [*chain, module])
            if found:
                return found
        done.add(module)
        return None

    return next((found for module in sorted(graph) if (found := walk(module, []))), None)


@pytest.mark.parametrize("room", ["shipyard.pipeline", "shipyard.serve", "shipyard"])
def test_no_import_circle(room: str) -> None:
    assert _circle(room) is None, " -> ".join(_circle(room) or [])


def test_transports_reach_models_only_through_the_data_plane() -> None:
    route_sets = {"shipyard.serve.transports.v2", "shipyard.serve.transports.openai", "shipyard.serve.transports.grpc"}
    for module in (m for m in MODULES if m.startswith("shipyard.serve.transports.")):
        imported = set(_imports(module))
        assert not {i for i in imported if i.startswith("shipyard.registry")}, module
        assert not {i for i in imported if i.startswith(("shipyard.serve.core.repository",
                                                         "shipyard.serve.core.runtime"))}, module  # fmt: skip
        others = (imported & route_sets) - {module}
        if module != "shipyard.serve.transports.grpc_native":  # gRPC's native front end serves grpc.py's methods
            assert not others, f"{module} imports {others}"


def test_the_circle_check_finds_a_circle(tmp_path: Path) -> None:
    """The walk above is not vacuous: the pipeline's old circle (context.py importing language.py back) is
    found when it is put back in."""
    MODULES["shipyard.pipeline.circle_a"] = tmp_path / "circle_a.py"
    MODULES["shipyard.pipeline.circle_b"] = tmp_path / "circle_b.py"
    (tmp_path / "circle_a.py").write_text("from shipyard.pipeline import circle_b\n")
    (tmp_path / "circle_b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                          "    from shipyard.pipeline.circle_a import x\n")  # fmt: skip
    try:
        assert _circle("shipyard.pipeline") == ["shipyard.pipeline.circle_a", "shipyard.pipeline.circle_b",
                                                "shipyard.pipeline.circle_a"]  # fmt: skip
    finally:
        del MODULES["shipyard.pipeline.circle_a"], MODULES["shipyard.pipeline.circle_b"]


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
