"""Stock clients against the real server: tritonclient HTTP and gRPC, sync and asyncio, every datatype."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from tritonclient.utils import InferenceServerException

from shipyard.dtypes import BY_V2
from shipyard.registry import LocalRegistry
from shipyard.serve.transports import grpc_native
from tests._helpers import sample_data
from tests.serve.conftest import RunningServer, start_server, stop_server

DATATYPES = sorted(BY_V2)


def _inputs(module: Any, data: np.ndarray, datatype: str, binary: bool = True) -> list[Any]:
    inp = module.InferInput("x", list(data.shape), datatype)
    if module is httpclient:
        inp.set_data_from_numpy(data, binary_data=binary)
    else:
        inp.set_data_from_numpy(data)
    return [inp]


@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("mode", ["http-binary", "http-json", "grpc"])
def test_every_datatype_round_trips(server: RunningServer, datatype: str, mode: str) -> None:
    data = sample_data(datatype, (2, 3), seed=len(datatype))
    if mode == "grpc":
        client: Any = grpcclient.InferenceServerClient(server.grpc_url)
        outputs = [grpcclient.InferRequestedOutput("y")]
        result = client.infer(f"id_{datatype.lower()}", _inputs(grpcclient, data, datatype), outputs=outputs)
    else:
        binary = mode == "http-binary"
        client = httpclient.InferenceServerClient(server.http_url)
        outputs = [httpclient.InferRequestedOutput("y", binary_data=binary)]
        result = client.infer(f"id_{datatype.lower()}", _inputs(httpclient, data, datatype, binary), outputs=outputs)
    got = result.as_numpy("y")
    assert got.shape == (2, 3)
    if mode == "http-json" and datatype == "BYTES":  # JSON carries text: tritonclient hands back str
        got = np.vectorize(str.encode, otypes=[object])(got)
    assert got.tolist() == data.tolist()


def _reference(model: str, x: np.ndarray, server: RunningServer) -> np.ndarray:
    folder = server.registry.path(model)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]  # type: ignore[no-any-return]


def test_results_match_in_process_onnx_runtime(server: RunningServer) -> None:
    x = sample_data("FP32", (5, 16), seed=3)
    expected = _reference("mlp:1", x, server)
    http = httpclient.InferenceServerClient(server.http_url).infer("mlp", _inputs(httpclient, x, "FP32"))
    grpc = grpcclient.InferenceServerClient(server.grpc_url).infer("mlp", _inputs(grpcclient, x, "FP32"))
    np.testing.assert_allclose(http.as_numpy("logits"), expected, rtol=1e-6)
    np.testing.assert_allclose(grpc.as_numpy("logits"), expected, rtol=1e-6)
    versioned = httpclient.InferenceServerClient(server.http_url).infer(
        "mlp", _inputs(httpclient, x, "FP32"), model_version="1", request_id="req-7"
    )
    assert versioned.get_response()["id"] == "req-7"
    assert versioned.get_response()["model_version"] == "1"


async def test_asyncio_clients(server: RunningServer) -> None:
    x = sample_data("FP32", (1, 16), seed=4)
    expected = _reference("mlp:1", x, server)
    http = httpaio.InferenceServerClient(server.http_url)
    grpc = grpcaio.InferenceServerClient(server.grpc_url)
    try:
        assert await http.is_server_ready()
        assert await grpc.is_model_ready("mlp")
        r1 = await http.infer("mlp", _inputs(httpaio, x, "FP32"))
        r2 = await grpc.infer("mlp", _inputs(grpcaio, x, "FP32"))
        np.testing.assert_allclose(r1.as_numpy("logits"), expected, rtol=1e-6)
        np.testing.assert_allclose(r2.as_numpy("logits"), expected, rtol=1e-6)

        async def requests() -> Any:
            for i in range(3):
                yield {"model_name": "mlp", "inputs": _inputs(grpcaio, x * i, "FP32"), "request_id": str(i)}

        seen = []
        async for result, error in grpc.stream_infer(requests()):
            assert error is None
            seen.append(result.get_response().id)
        assert seen == ["0", "1", "2"]
    finally:
        await http.close()
        await grpc.close()


def test_sync_grpc_stream_reports_errors_in_band(server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    x = sample_data("FP32", (1, 16))
    client.async_stream_infer("mlp", _inputs(grpcclient, x, "FP32"))
    client.async_stream_infer("nope", _inputs(grpcclient, x, "FP32"))
    client.async_stream_infer("mlp", _inputs(grpcclient, x, "FP32"))
    got = [results.get(timeout=10) for _ in range(3)]
    client.stop_stream()
    assert got[0][1] is None
    assert "model 'nope' is not loaded" in str(got[1][1])
    assert got[2][1] is None


def test_metadata_config_and_statistics(server: RunningServer) -> None:
    http = httpclient.InferenceServerClient(server.http_url)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    assert http.is_server_live()
    assert grpc.is_server_ready()
    assert "binary_tensor_data" in http.get_server_metadata()["extensions"]
    meta = http.get_model_metadata("mlp")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert grpc.get_model_metadata("mlp", "1").outputs[0].shape == [-1, 4]
    config = grpc.get_model_config("mlp").config
    assert config.max_batch_size == 64
    assert list(config.input[0].dims) == [16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 0  # Triton's default: no added wait
    assert http.get_model_config("id_bytes")["input"][0]["data_type"] == "TYPE_STRING"
    http.infer("mlp", _inputs(httpclient, sample_data("FP32", (3, 16)), "FP32"))
    stats = http.get_inference_statistics("mlp")["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] >= 1
    assert stats["inference_count"] >= 3
    grpc_stats = grpc.get_inference_statistics("mlp").model_stats[0]
    assert grpc_stats.execution_count >= 1
    index = {(m["name"], m["version"]): m["state"] for m in http.get_model_repository_index()}
    assert index[("mlp", "1")] == "READY"
    assert index[("mlp", "2")] == "UNAVAILABLE"


def test_requested_outputs_and_errors_through_tritonclient(server: RunningServer) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    x = sample_data("FP32", (1, 16))
    with pytest.raises(InferenceServerException, match="unknown output 'nope'"):
        client.infer("mlp", _inputs(httpclient, x, "FP32"), outputs=[httpclient.InferRequestedOutput("nope")])
    with pytest.raises(InferenceServerException, match="datatype FP64, the model expects FP32"):
        client.infer("mlp", _inputs(httpclient, x.astype(np.float64), "FP64"))
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match=r"StatusCode\.NOT_FOUND.*no loaded version 9"):
        grpc.infer("mlp", _inputs(grpcclient, x, "FP32"), model_version="9")
    with pytest.raises(InferenceServerException, match=r"StatusCode\.INVALID_ARGUMENT.*does not match \[-1, 16\]"):
        grpc.infer("mlp", _inputs(grpcclient, sample_data("FP32", (1, 15)), "FP32"))
    assert client.is_server_live()


@pytest.mark.parametrize("frontend", ["python", "native"])
def test_each_grpc_front_end_answers_the_same(frontend: str, model_registry: LocalRegistry, tmp_path: Path) -> None:
    """grpc.aio and the native front end serve one method table: answers, in-band stream errors, bad bytes."""
    if frontend == "native" and not grpc_native.available():
        pytest.fail("the native front end is not built: run scripts/build_native.sh (needs libgrpc++-dev)")
    server = start_server(model_registry, tmp_path / "log", "mlp:1", extra_args=("--grpc-frontend", frontend))
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        x = sample_data("FP32", (3, 16))
        got = client.infer("mlp", _inputs(grpcclient, x, "FP32")).as_numpy("logits")
        session = ort.InferenceSession(str(model_registry.path("mlp:1") / "model.onnx"))
        np.testing.assert_allclose(got, session.run(None, {"x": x})[0], rtol=1e-5)
        results: queue.Queue[Any] = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for name in ("mlp", "nope", "mlp"):
            client.async_stream_infer(name, _inputs(grpcclient, x, "FP32"))
        answers = [results.get(timeout=10) for _ in range(3)]
        client.stop_stream()
        assert [error is None for _, error in answers] == [True, False, True]
        with grpc.insecure_channel(server.grpc_url) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            with pytest.raises(grpc.RpcError) as refused:
                call(b"\xff\xff\xff")
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as unknown:
                channel.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")(b"")
            assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        assert stop_server(server) == 0
    log = server.log.read_text()
    assert ("native front end" if frontend == "native" else "(grpc.aio)") in log
    assert "Traceback" not in log
