"""A spec folder whose model (an MLP built here) is registered, with a `deploy:` section to render."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shipyard.pipeline import import_onnx
from shipyard.registry import LocalRegistry
from shipyard.spec import LoadedSpec, load_spec
from tests._helpers import free_port, make_mlp_onnx, write_spec

Project = Callable[..., LoadedSpec]


@pytest.fixture
def registry(tmp_path: Path) -> LocalRegistry:
    registry = LocalRegistry(tmp_path / "registry")
    import_onnx(make_mlp_onnx(tmp_path / "mlp.onnx"), "mlp", registry)
    return registry


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """Write shipyard.yaml with the given `deploy:` settings (free loopback ports) and load it."""
    folder = tmp_path / "project"
    folder.mkdir()

    def make(serve: dict[str, Any] | None = None, **deploy: Any) -> LoadedSpec:
        ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
        spec = {"name": "mlp", "model": {"format": "onnx", "path": str(tmp_path / "mlp.onnx")},
                "serve": serve or {}, "deploy": {"ports": ports, **deploy}}  # fmt: skip
        return load_spec(write_spec(folder, spec))

    return make
