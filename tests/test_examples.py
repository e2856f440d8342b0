"""The bundled examples run end to end: init, train, build, serve, and their own client."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shipyard.registry import LocalRegistry
from tests.serve.conftest import start_server, stop_server


def _run(
    name: str, tmp_path: Path, cli: Callable[..., Any], model: str | None = None
) -> tuple[str, LocalRegistry, str]:
    """init, train.py, build, serve, client.py: returns (training output, registry, client output)."""
    folder, registry = tmp_path / name, LocalRegistry(tmp_path / "registry")
    assert cli("init", "--example", name, str(folder)).code == 0
    trained = subprocess.run([sys.executable, str(folder / "train.py")], capture_output=True, text=True, check=True)
    built = cli("build", str(folder), "--registry", str(registry.root))
    assert built.code == 0, built.err
    server = start_server(registry, tmp_path / "server.log", model or name)
    try:
        asked = subprocess.run([sys.executable, str(folder / "client.py"), "--url", server.base()],
                               capture_output=True, text=True, check=True)  # fmt: skip
    finally:
        stop_server(server)
    return trained.stdout, registry, asked.stdout


def test_wine_example_from_init_to_client(tmp_path: Path, cli: Callable[..., Any]) -> None:
    trained, registry, answered = _run("wine", tmp_path, cli)
    assert "held-out accuracy" in trained
    assert registry.manifest("wine:1").metrics["accuracy"] >= 0.95
    assert "model wine version 1" in answered
    correct = int(answered.split("/10 correct")[0].rsplit("\n", 1)[-1])
    assert correct >= 9, answered


def test_sensors_example_trains_builds_and_serves(tmp_path: Path, cli: Callable[..., Any]) -> None:
    trained, registry, answered = _run("sensors", tmp_path, cli)
    assert "held-out precision" in trained
    manifest = registry.manifest("sensors:1")
    assert manifest.metrics["f1"] > 0.7
    (search,) = [s for s in manifest.lineage if s.step == "optimize"]
    assert search.params["candidates"][0]["step"] == "quantize_dynamic"  # tried, accepted or not
    precision = float(answered.split("precision ")[1].split(",")[0])
    assert precision >= 0.8, answered


def test_recsys_example_serves_top_k(tmp_path: Path, cli: Callable[..., Any]) -> None:
    trained, registry, answered = _run("recsys", tmp_path, cli)
    assert "held-out recall@10" in trained
    built = registry.manifest("recsys:1").metrics["top_k"]
    served = float(answered.rsplit("users: ", 1)[1])
    assert served == round(built, 3)  # the served top-10 ids agree with the evaluated scores
    assert served > 0.05  # twice random (10 of ~377 unseen items: 0.027)


@pytest.mark.slow  # training takes minutes: `pytest -m slow tests/test_examples.py`
def test_chat_example_answers_through_the_openai_client(tmp_path: Path, cli: Callable[..., Any]) -> None:
    trained, registry, answered = _run("chat", tmp_path, cli, model="logbook-chat")
    assert "save_pretrained" in trained
    assert registry.manifest("logbook-chat:1").metrics["perplexity"] < 3
    assert "Day 12: we sailed from Hamburg toward Naples" in answered  # a trained day, word for word
    assert "16 concurrent streams" in answered
