"""A real `shipyard serve` process on loopback, serving one identity model per V2 datatype and an MLP."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from shipyard.dtypes import BY_V2
from shipyard.pipeline import build, import_onnx
from shipyard.registry import LocalRegistry
from shipyard.spec import load_spec
from tests._helpers import causal_spec, free_port, make_hf_causal, make_identity_onnx, make_mlp_onnx, write_spec

BENCH = Path(__file__).resolve().parents[2] / "bench"


@dataclasses.dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    registry: LocalRegistry
    http_port: int
    grpc_port: int
    metrics_port: int
    log: Path
    ca: Path | None = None  # the CA that signed the server's certificate when it serves TLS

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def base(self) -> str:
        return f"{'https' if self.ca else 'http'}://{self.http_url}"


class Load:
    """Client threads (HTTP and gRPC) sending requests until stopped; every answer is checked."""

    def __init__(self, server: RunningServer, expected: list[np.ndarray], x: np.ndarray) -> None:
        self.server, self.expected, self.x = server, expected, x
        self.sent = self.failed = self.wrong = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i % 2 == 0,)) for i in range(4)]

    def _run(self, use_grpc: bool) -> None:
        module = grpcclient if use_grpc else httpclient
        client = module.InferenceServerClient(self.server.grpc_url if use_grpc else self.server.http_url)
        deadline = time.monotonic() + 60  # bounded, whatever happens
        while not self._stop.is_set() and time.monotonic() < deadline:
            inp = module.InferInput("x", list(self.x.shape), "FP32")
            inp.set_data_from_numpy(self.x)
            try:
                got = client.infer("mlp", [inp]).as_numpy("logits")
                ok = any(np.allclose(got, e, rtol=1e-5) for e in self.expected)
                with self._lock:
                    self.sent += 1
                    self.wrong += not ok
            except Exception as exc:
                with self._lock:
                    self.sent += 1
                    self.failed += 1
                    self.errors.append(str(exc))

    @property
    def ok(self) -> int:
        """Answers that arrived and were right."""
        return self.sent - self.failed - self.wrong

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + 30
        while self.sent < count and time.monotonic() < deadline:
            time.sleep(0.01)


def serve_until_exit(registry: LocalRegistry, *models: str) -> subprocess.CompletedProcess[str]:
    """Run `shipyard serve` that is expected to refuse to start; its exit code and output."""
    cmd = [sys.executable, "-m", "shipyard", "serve", *models, "--registry", str(registry.root),
           "--http-port", str(free_port()), "--grpc-port", "0", "--metrics-port", "0"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def start_server(
    registry: LocalRegistry,
    log: Path,
    *models: str,
    max_body_mb: float = 1.0,
    wait_ready: bool = True,
    extra_args: tuple[str, ...] = (),
    ca: Path | None = None,
) -> RunningServer:
    """Start `shipyard serve` and wait until it is ready (or only live, with wait_ready=False)."""
    http, grpc, metrics = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "shipyard", "serve", *models, "--registry", str(registry.root),
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--max-body-mb", str(max_body_mb), *extra_args]  # fmt: skip
    with log.open("wb") as out:  # the child keeps its own descriptor
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    server = RunningServer(process, registry, http, grpc, metrics, log, ca)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        try:
            probe = "ready" if wait_ready else "live"
            verify = ssl.create_default_context(cafile=str(ca)) if ca else True
            if httpx.get(f"{server.base()}/v2/health/{probe}", timeout=1, verify=verify).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"server not ready in 60 s: {log.read_text()}")


@contextlib.contextmanager
def byte_level_lm_server(folder: Path, template: str | None = None, context: int = 2048) -> Iterator[RunningServer]:
    """A random-initialised tiny Llama with a byte-level BPE (it can write any text: JSON, tool calls) built
    through the real pipeline and served; `template` replaces its chat template."""
    make_hf_causal(folder / "hf", byte_level=True, context=context)
    if template is not None:
        (folder / "hf" / "chat_template.jinja").write_text(template)
    registry = LocalRegistry(folder / "registry")
    build(load_spec(write_spec(folder, causal_spec(max_new_tokens=96))), registry)
    running = start_server(registry, folder / "server.log", "lm")
    try:
        yield running
    finally:
        assert stop_server(running) == 0
    assert "Traceback" not in running.log.read_text()


def perf_analyzer_binary() -> str:
    """The perf_analyzer of bench/fetch_perf_analyzer.sh (fetched once, then cached)."""
    fetched = subprocess.run(["bash", str(BENCH / "fetch_perf_analyzer.sh")], capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    return fetched.stdout.strip().splitlines()[-1]


def stop_server(server: RunningServer) -> int:
    server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        raise


@pytest.fixture(scope="session")
def model_registry(tmp_path_factory: pytest.TempPathFactory) -> LocalRegistry:
    root = tmp_path_factory.mktemp("serve")
    registry = LocalRegistry(root / "registry")
    for datatype in BY_V2:
        path = make_identity_onnx(root / f"{datatype}.onnx", datatype)
        import_onnx(path, f"id_{datatype.lower()}", registry)
    import_onnx(make_mlp_onnx(root / "mlp.onnx"), "mlp", registry)
    import_onnx(make_mlp_onnx(root / "mlp2.onnx", seed=1), "mlp", registry)  # version 2, loaded on demand
    return registry


@pytest.fixture(scope="session")
def server(model_registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    models = [f"id_{d.lower()}" for d in BY_V2] + ["mlp:1"]
    running = start_server(model_registry, tmp_path_factory.mktemp("log") / "server.log", *models)
    yield running
    assert stop_server(running) == 0, running.log.read_text()
    assert "Traceback" not in running.log.read_text()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Loopback only: make sure no environment proxy setting reroutes the clients.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
