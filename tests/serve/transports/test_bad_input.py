"""Bad input gets a V2 error (JSON `{"error": ...}` with the right status) and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shipyard.registry import LocalRegistry
from shipyard.serve.app import compose
from shipyard.serve.core.repository import ModelRepository
from shipyard.serve.settings import ServeSettings
from shipyard.serve.transports.http import HttpApp
from tests.serve.conftest import RunningServer

GOOD = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}


def _infer(server: RunningServer, body: bytes | dict[str, object], model: str = "mlp",
           headers: dict[str, str] | None = None) -> httpx.Response:  # fmt: skip
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.base()}/v2/models/{model}/infer", content=content, headers=headers or {}, timeout=10)


def _binary_body(header_extra: dict[str, object] | None = None, raw: bytes = b"\x00" * 64) -> tuple[bytes, int]:
    header = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                          "parameters": {"binary_data_size": len(raw), **(header_extra or {})}}]}  # fmt: skip
    encoded = json.dumps(header).encode()
    return encoded + raw, len(encoded)


def _good(**changes: object) -> dict[str, object]:
    return {"inputs": [{**GOOD["inputs"][0], **changes}]}  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("body", "model", "status", "message"),
    [
        (b"{not json", "mlp", 400, "malformed JSON"),
        (b"[]", "mlp", 400, "must be a JSON object"),
        ({"inputs": []}, "mlp", 400, "'inputs' must be a non-empty list"),
        (_good(name="wrong"), "mlp", 400, "unexpected input 'wrong'"),
        (_good(shape=[1, 15], data=[0.5] * 15), "mlp", 400, "does not match [-1, 16]"),
        (_good(shape=[2, 16]), "mlp", 400, "data has 16 elements, shape [2, 16] needs 32"),
        (_good(datatype="INT32", data=[1] * 16), "mlp", 400, "datatype INT32"),
        (_good(datatype="FP99"), "mlp", 400, "unknown datatype 'FP99'"),
        (_good(shape="1x16"), "mlp", 400, "shape must be a list of integers"),
        ({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32"}]}, "mlp", 400, "neither 'data'"),
        (_good(shape=[65, 16], data=[0.5] * 1040), "mlp", 400, "exceeds the model's max_batch_size 64"),
        (GOOD, "unknown", 404, "model 'unknown' is not loaded"),
        (GOOD, "mlp/versions/7", 404, "no loaded version 7"),
        (GOOD, "mlp/versions/x", 400, "model version must be a whole number"),
    ],
)
def test_bad_requests(server: RunningServer, body: bytes | dict[str, object], model: str, status: int,
                      message: str) -> None:  # fmt: skip
    response = _infer(server, body, model)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert _infer(server, GOOD).status_code == 200  # still serving


def test_binary_extension_errors(server: RunningServer) -> None:
    body, length = _binary_body()
    ok = _infer(server, body, headers={"Inference-Header-Content-Length": str(length)})
    assert ok.status_code == 200, ok.text
    lies = [
        ({"Inference-Header-Content-Length": str(len(body) + 5)}, "does not fit a body"),
        ({"Inference-Header-Content-Length": str(length - 3)}, "malformed JSON"),
        ({"Inference-Header-Content-Length": "abc"}, "must be a whole number"),
    ]
    for headers, message in lies:
        response = _infer(server, body, headers=headers)
        assert response.status_code == 400
        assert message in response.json()["error"]
    short, length = _binary_body(raw=b"\x00" * 60)
    response = _infer(server, short, headers={"Inference-Header-Content-Length": str(length)})
    assert "raw data is 60 bytes, but FP32[1, 16] needs 64 bytes" in response.json()["error"]
    extra, length = _binary_body()
    response = _infer(server, extra + b"junk", headers={"Inference-Header-Content-Length": str(length)})
    assert "4 bytes of binary data are not claimed" in response.json()["error"]
    claim, length = _binary_body(raw=b"\x00" * 64)
    claim = claim.replace(b'"binary_data_size": 64', b'"binary_data_size": 640')
    response = _infer(server, claim, headers={"Inference-Header-Content-Length": str(length + 1)})
    assert response.status_code == 400


def test_body_over_the_limit_is_413(server: RunningServer) -> None:
    big = b"{" + b" " * (1 << 20) + b"}"  # the server runs with --max-body-mb 1
    response = _infer(server, big)
    assert response.status_code == 413
    assert "exceeds the limit" in response.json()["error"]

    def chunks() -> object:  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b" " * 65536

    streamed = httpx.post(f"{server.base()}/v2/models/mlp/infer", content=chunks(), timeout=10)  # type: ignore[arg-type]
    assert streamed.status_code == 413


def test_json_accepted_whatever_the_content_type_and_never_compressed(server: RunningServer) -> None:
    response = httpx.post(
        f"{server.base()}/v2/models/mlp/infer", content=json.dumps(GOOD).encode(),
        headers={"Content-Type": "application/octet-stream", "Accept-Encoding": "gzip"}, timeout=10,
    )  # fmt: skip
    assert response.status_code == 200
    assert "content-encoding" not in response.headers
    assert len(response.json()["outputs"][0]["data"]) == 4


def test_routes_and_methods(server: RunningServer) -> None:
    base = server.base()
    assert httpx.get(f"{base}/v2/nothing").status_code == 404
    assert httpx.get(f"{base}/other").status_code == 404
    assert httpx.get(f"{base}/v2/models/mlp/infer").status_code == 405
    assert httpx.post(f"{base}/v2/health/live").status_code == 405
    assert httpx.get(f"{base}/v2/models/mlp/ready").json() == {"name": "mlp", "ready": True}
    assert httpx.get(f"{base}/v2/models/nope/ready").status_code == 400
    assert httpx.get(f"{base}/v2/health/live").json() == {"live": True}


# --- in process: a full queue and random bodies -----------------------------------------------


@pytest.fixture
async def app(model_registry: LocalRegistry) -> AsyncIterator[tuple[HttpApp, ModelRepository]]:
    server = compose(ServeSettings(models=["mlp:1"], max_body_bytes=1 << 20), model_registry)
    await server.repository.load_all(server.settings.models)
    server.services.dataplane.loading_done = True
    yield server.rest, server.repository
    await server.repository.unload_all()


async def test_full_queue_answers_503(app: tuple[HttpApp, ModelRepository]) -> None:
    rest, repository = app
    handle = repository.get("mlp")
    handle.batcher._max_queue = 2  # a tiny queue for this test
    big = {"inputs": [{"name": "x", "shape": [64, 16], "datatype": "FP32", "data": [0.1] * 1024}]}
    transport = httpx.ASGITransport(app=rest)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        responses = await asyncio.gather(*(client.post("/v2/models/mlp/infer", json=big) for _ in range(40)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503}
        assert codes.count(503) > 0
        assert "queue is full" in next(r for r in responses if r.status_code == 503).json()["error"]
        assert (await client.post("/v2/models/mlp/infer", json=GOOD)).status_code == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
tensor = st.fixed_dictionaries(
    {"name": st.sampled_from(["x", "y", ""]), "datatype": st.sampled_from(["FP32", "INT64", "BYTES", "BOOL", "X"])},
    optional={"shape": st.lists(st.integers(-2, 20), max_size=3), "data": json_values,
              "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-5, 100)})},
)  # fmt: skip
PRINTABLE = st.characters(min_codepoint=32, max_codepoint=126)  # header values are ASCII
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"inputs": st.lists(tensor, max_size=3)}, optional={"outputs": json_values, "id": json_values}
    ).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=bodies,
    header=st.none()
    | st.integers(-5, 300).map(str)
    | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=5),
)
async def test_random_bodies_never_cause_a_5xx(
    app: tuple[HttpApp, ModelRepository], body: bytes, header: str | None
) -> None:
    rest, _ = app
    headers = {} if header is None else {"Inference-Header-Content-Length": header}
    transport = httpx.ASGITransport(app=rest)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/v2/models/mlp/infer", content=body, headers=headers)
        assert response.status_code < 500, (body, response.text)
        if response.status_code != 200:
            assert isinstance(response.json()["error"], str)
        assert (await client.get("/v2/health/live")).status_code == 200


@pytest.fixture
async def managed_app(model_registry: LocalRegistry) -> AsyncIterator[HttpApp]:
    """The in-process app with the repository API on, so load parameters reach version parsing."""
    server = compose(ServeSettings(models=["mlp:1"], allow_management=True), model_registry)
    await server.repository.load_all(server.settings.models)
    server.services.dataplane.loading_done = True
    yield server.rest
    await server.repository.unload_all()


# Numbers as clients write them: digits of every script, very long ASCII digit runs, and anything else.
number_texts = st.one_of(
    st.text(st.characters(categories=["Nd"]), min_size=1, max_size=12),
    st.text(st.sampled_from("0123456789"), min_size=1, max_size=6000),
    st.text(max_size=20),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(number=number_texts)
async def test_random_numbers_in_headers_paths_and_parameters_never_cause_a_5xx(
    managed_app: HttpApp, number: str
) -> None:
    transport = httpx.ASGITransport(app=managed_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        answers = [
            await client.post(f"/v2/models/mlp/versions/{quote(number, safe='')}/infer", json=GOOD),
            await client.post("/v2/repository/models/mlp/load", json={"parameters": {"version": number}}),
            await client.post("/v2/repository/models/mlp/unload", json={"parameters": {"version": number + "x"}}),
        ]
        if number.isascii() and number.isprintable():  # what an HTTP header can carry
            header = {"Inference-Header-Content-Length": number}
            answers.append(await client.post("/v2/models/mlp/infer", content=json.dumps(GOOD).encode(), headers=header))
        for response in answers:
            assert response.status_code < 500, (number[:40], response.text)
        assert (await client.get("/v2/models/mlp/ready")).status_code == 200  # nothing was unloaded by mistake


def test_server_is_alive_after_all_of_it(server: RunningServer) -> None:
    assert httpx.get(f"{server.base()}/v2/health/ready").status_code == 200
    x = np.ones((1, 16), dtype=np.float32)
    assert _infer(server, {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).status_code == 200  # fmt: skip


def test_bytes_for_a_string_tensor_must_be_utf8(server: RunningServer) -> None:
    raw = b"\x01\x00\x00\x00\xff" * 3  # three one-byte elements, not UTF-8
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()  # fmt: skip
    response = _infer(server, header + raw, "id_bytes", {"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 400
    assert "must be UTF-8 text" in response.json()["error"]


async def test_a_version_not_loaded_is_unavailable_not_bad_input(model_registry: LocalRegistry) -> None:
    """A runtime asked to infer before it is loaded (or after unload) answers 503, not 400."""
    from shipyard.errors import UnavailableError
    from shipyard.serve.core.repository import serve_settings
    from shipyard.serve.core.runtime import OrtRuntime
    from shipyard.serve.transports.edge import HTTP_STATUS

    manifest = model_registry.manifest("mlp:1")
    runtime = OrtRuntime(model_registry.path("mlp:1"), manifest, serve_settings(manifest), None)
    with pytest.raises(UnavailableError, match="is not loaded") as caught:
        await runtime.infer({"x": np.zeros((1, 16), np.float32)})
    assert HTTP_STATUS[caught.value.kind] == 503


@pytest.mark.parametrize(
    ("url", "headers", "message"),
    [
        ("/v2/models/mlp/infer", {"Inference-Header-Content-Length": "9" * 4301}, "at most 18 ASCII digits"),
        ("/v2/models/mlp/infer", {"Inference-Header-Content-Length": "\u0661\u0662".encode()}, "ASCII digits"),
        ("/v2/models/mlp/versions/" + "1" * 4301 + "/infer", {}, "model version must be a whole number"),
        ("/v2/models/mlp/versions/%C2%B2/infer", {}, "model version must be a whole number"),
        ("/v2/models/mlp/versions/%D9%A1/infer", {}, "model version must be a whole number"),  # Arabic-Indic 1
    ],
)
def test_numbers_from_clients_are_ascii_and_bounded(
    server: RunningServer, url: str, headers: dict[str, str | bytes], message: str
) -> None:
    """These hit Python's int-parsing limit (500 and a traceback per request), or read an Arabic-Indic one as 1."""
    response = httpx.post(f"{server.base()}{url}", json=GOOD, headers=headers, timeout=10)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_numbers_from_grpc_clients_are_ascii_and_bounded(server: RunningServer) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(server.grpc_url)
    x = grpcclient.InferInput("x", [1, 16], "FP32")
    x.set_data_from_numpy(np.zeros((1, 16), np.float32))
    for version in ("1" * 4301, "\u0661"):
        with pytest.raises(InferenceServerException, match="model version must be a whole number") as caught:
            client.infer("mlp", [x], model_version=version)
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "Traceback" not in server.log.read_text()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request_bodies_as_tritonclient_sends_them(server: RunningServer, algorithm: str) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    inputs = []
    for binary in (False, True):
        item = httpclient.InferInput("x", list(x.shape), "FP32")
        item.set_data_from_numpy(x, binary_data=binary)
        inputs.append(item)
    plain = client.infer("mlp", [inputs[0]]).as_numpy("logits")
    for item in inputs:
        got = client.infer("mlp", [item], request_compression_algorithm=algorithm).as_numpy("logits")
        np.testing.assert_allclose(got, plain, rtol=1e-6)


def test_a_compression_bomb_gets_413_and_a_broken_stream_400(server: RunningServer) -> None:
    import gzip
    import zlib

    bomb = gzip.compress(b"{" + b" " * (8 << 20) + b"}")  # 8 MiB of JSON in ~8 KiB; the limit is 1 MiB
    assert len(bomb) < 64 << 10
    response = _infer(server, bomb, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 413, response.text
    assert "decompressed request body exceeds the limit" in response.json()["error"]
    truncated = zlib.compress(json.dumps(GOOD).encode())[:-8]
    broken = _infer(server, truncated, headers={"Content-Encoding": "deflate"})
    assert broken.status_code == 400
    unknown = _infer(server, json.dumps(GOOD).encode(), headers={"Content-Encoding": "br"})
    assert unknown.status_code == 400
    assert "not supported: use gzip or deflate" in unknown.json()["error"]
