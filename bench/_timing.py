"""What the benchmarks share: the in-process ONNX Runtime timing loop (the floor servers are compared with),
on sessions made by shipyard.onnxrt.session (the server's own session setup), starting a server, and a big
model of a chosen size."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def time_runs(session: ort.InferenceSession, feeds: dict[str, np.ndarray], seconds: float) -> dict[str, float]:
    """session.run in a loop for `seconds` after a warm-up: p50/p99 in ms and samples per second."""
    for _ in range(20):
        session.run(None, feeds)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    batch = len(next(iter(feeds.values())))
    return {
        "p50_ms": statistics.median(times) * 1e3,
        "p99_ms": float(np.percentile(times, 99)) * 1e3,
        "per_s": batch * len(times) / sum(times),
    }


def start_server(
    registry: Path, name: str, http: int, grpc: int, extra: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """`shipyard serve NAME [EXTRA...]` on loopback, returned once it is ready (within a minute); the caller
    stops it."""
    cmd = [sys.executable, "-m", "shipyard", "serve", name, "--registry", str(registry), "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", "0", *extra]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{http}/v2/health/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.1)  # listening but still loading (400) or not listening: ask again shortly
    return server


def matmul_chain(path: Path, layers: int, width: int) -> None:
    """A chain of `layers` width x width float32 MatMuls (random weights, scaled to keep activations near 1)
    saved with its weights in a side file: a big model whose size is chosen by its layer count."""
    rng = np.random.default_rng(0)
    nodes, weights, current = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], initializer=weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data")
