"""Per-request cost of the REST path in process: JSON infer requests driven straight into the ASGI app.

No sockets, no uvicorn, no client: what remains is shipyard's own request path (routing, access control,
body reading, decoding, validation, batching, the ONNX Runtime call on a 16x4 MatMul, encoding). Prints the
best of 5 batches of N requests, in microseconds per request.

    .venv/bin/python bench/rest_overhead.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import uvloop
from onnx import TensorProto, helper, numpy_helper

from shipyard.pipeline import import_onnx
from shipyard.registry import LocalRegistry
from shipyard.serve.app import compose
from shipyard.serve.settings import ServeSettings

BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}).encode()


def tiny_model(path: Path) -> Path:
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], initializer=[weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


async def measure(requests: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        registry = LocalRegistry(Path(tmp) / "registry")
        import_onnx(tiny_model(Path(tmp) / "tiny.onnx"), "m", registry)
        server = compose(ServeSettings(models=["m"]), registry)
        await server.repository.load_all(["m"])
        server.services.dataplane.loading_done = True
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
        scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer", "client": ("127.0.0.1", 1),
                 "headers": headers}  # fmt: skip
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": BODY, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        for _ in range(500):  # warm-up
            await server.rest(scope, receive, send)
        assert sent[0]["status"] == 200, sent[1]
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(requests):
                await server.rest(scope, receive, send)
            best = min(best, (time.perf_counter() - start) / requests * 1e6)
            sent.clear()
        await server.repository.unload_all()
        return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    print(f"REST path in process: {uvloop.run(measure(args.requests)):.2f} µs per request (best of 5)")


if __name__ == "__main__":
    main()
