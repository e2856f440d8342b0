"""The transport ceiling: perf_analyzer against servers that answer every V2 call with a canned reply.

Same stacks as `shipyard serve` (uvicorn + httptools + uvloop for REST, grpc.aio for gRPC), no model,
no decoding: what the Python transports alone cost on this machine, to put serve_bench.py in context.

Run:  .venv/bin/python bench/transport_ceiling.py [--window-ms 5000] [--passes 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import uvicorn
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_bench import free_port, run_matrix  # noqa: E402

CONFIG = {"name": "mlp", "platform": "onnxruntime_onnx", "max_batch_size": 64,
          "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [784]}],
          "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}]}  # fmt: skip
META = {"name": "mlp", "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]}  # fmt: skip
LOGITS = np.zeros((1, 10), np.float32).tobytes()


async def canned_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    path = scope["path"]
    headers = [(b"content-type", b"application/json")]
    if path.endswith("/infer"):
        header = json.dumps(
            {
                "model_name": "mlp",
                "outputs": [
                    {"name": "logits", "datatype": "FP32", "shape": [1, 10], "parameters": {"binary_data_size": 40}}
                ],
            }
        ).encode()
        body = header + LOGITS
        headers = [(b"content-type", b"application/octet-stream"),
                   (b"inference-header-content-length", str(len(header)).encode())]  # fmt: skip
    elif path.endswith("/config"):
        body = json.dumps(CONFIG).encode()
    elif path.endswith("/stats"):
        body = b'{"model_stats": []}'
    elif path.startswith("/v2/models/"):
        body = json.dumps(META).encode()
    else:
        body = b'{"name": "canned", "version": "0", "extensions": []}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class CannedServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.ServerMetadataResponse(name="canned", version="0")

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        from google.protobuf import json_format

        return json_format.ParseDict(META, service_pb2.ModelMetadataResponse())

    async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        from google.protobuf import json_format

        return service_pb2.ModelConfigResponse(config=json_format.ParseDict(CONFIG, model_config_pb2.ModelConfig()))

    async def ModelStatistics(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.ModelStatisticsResponse()

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        response = service_pb2.ModelInferResponse(model_name="mlp", model_version="1")
        response.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
        response.raw_output_contents.append(LOGITS)
        return response


def run_servers(http_port: int, grpc_port: int) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(CannedServicer(), server)
        server.add_insecure_port(f"127.0.0.1:{grpc_port}")
        await server.start()
        config = uvicorn.Config(canned_asgi, host="127.0.0.1", port=http_port, http="httptools", loop="none",
                                lifespan="off", access_log=False, log_level="warning", proxy_headers=False)  # fmt: skip
        await uvicorn.Server(config).serve()

    import uvloop

    uvloop.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--window-ms", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    tool = subprocess.run(["bash", str(HERE / "fetch_perf_analyzer.sh")], capture_output=True, text=True, check=True)
    perf_tool = tool.stdout.strip().splitlines()[-1]
    http_port, grpc_port = free_port(), free_port()
    server = multiprocessing.get_context("spawn").Process(target=run_servers, args=(http_port, grpc_port))
    server.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{http_port}/v2", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    try:
        rows = run_matrix(perf_tool, [("http", http_port), ("grpc", grpc_port)], args.concurrency, args.passes,
                          args.window_ms)  # fmt: skip
    finally:
        server.terminate()
        server.join(timeout=10)
    print("| protocol | concurrency | throughput (inf/s) | p50 (ms) | p99 (ms) |")
    print("|---|---:|---:|---:|---:|")
    for protocol, concurrency, m in rows:
        print(f"| {protocol} (canned) | {concurrency} | {m['per_s']:,.0f} | {m['p50_us'] / 1000:.3f} | "
              f"{m['p99_us'] / 1000:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
