"""Shared fixtures: registries, small models built in the test, and an in-process CLI runner."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from shipyard.cli import main
from shipyard.registry import LocalRegistry
from tests._helpers import make_mlp_onnx


@pytest.fixture
def registry(tmp_path: Path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "registry")


@pytest.fixture
def mlp_onnx(tmp_path: Path) -> Path:
    return make_mlp_onnx(tmp_path / "mlp.onnx")


@dataclasses.dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run the real `shipyard` entry point in process, returning exit code and captured output."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
