"""Text models: a tokenizer in the artifact, strings over REST and gRPC, token ids to the graph.

The model is a bag-of-embeddings graph (masked mean of a lookup table) built here with onnx.helper and a
word-level tokenizer built with `tokenizers`, so the expected outputs can be computed with numpy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers

from shipyard.errors import ModelLoadError
from shipyard.pipeline import build
from shipyard.registry import LocalRegistry
from shipyard.spec import load_spec
from tests._helpers import write_spec
from tests.serve.conftest import RunningServer, start_server, stop_server

WORDS = ["[PAD]", "[UNK]", "the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "a"]
TABLE = np.random.default_rng(0).standard_normal((len(WORDS), 4)).astype(np.float32)
TEXTS = ["the cat sat on the mat", "a dog", "the dog ran far far away", "cat"]


def expected(texts: list[str]) -> np.ndarray:
    """The masked mean of the words' rows (unknown words → [UNK]), per text."""
    ids = [[WORDS.index(w) if w in WORDS else 1 for w in text.split()] for text in texts]
    return np.stack([TABLE[row].mean(0) for row in ids])


def make_text_model(folder: Path) -> None:
    """bag.onnx (input_ids, attention_mask → mean embedding), tokenizer.json, eval.npz (texts → expected)."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4])
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["rows"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis2"], ["m3"]),
        helper.make_node("Mul", ["rows", "m3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["m3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Div", ["total", "count"], ["embedding"]),
    ]
    inits = [numpy_helper.from_array(TABLE, "table"), numpy_helper.from_array(np.array([2], np.int64), "axis2"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]  # fmt: skip
    graph = helper.make_graph(nodes, "bag", [ids, mask], [out], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "bag.onnx"))
    np.savez(folder / "eval.npz", text=np.array(TEXTS * 5), y=expected(TEXTS * 5))


SPEC = {
    "name": "bag",
    "model": {"format": "onnx", "path": "bag.onnx", "tokenizer": {"path": "tokenizer.json", "max_length": 16}},
    "evaluation": {"dataset": {"kind": "npz", "path": "eval.npz", "inputs": {"text": "text"}}, "metric": "mse",
                   "latency": {"iterations": 20}},
    "serve": {"max_batch_size": 8},
}  # fmt: skip


@pytest.fixture(scope="module")
def text_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("text")
    make_text_model(folder)
    registry = LocalRegistry(folder / "registry")
    manifest = build(load_spec(write_spec(folder, SPEC)), registry)
    assert manifest.metrics["mse"] < 1e-10  # the tokenizer fed the graph what the numpy reference computes
    assert manifest.tokenizer is not None
    assert manifest.tokenizer.feeds == ["input_ids", "attention_mask"]
    running = start_server(registry, folder / "server.log", "bag")
    yield running
    assert stop_server(running) == 0
    assert "Traceback" not in running.log.read_text()


def test_strings_over_rest_give_the_graph_result_whatever_the_padding(text_server: RunningServer) -> None:
    meta = httpx.get(f"{text_server.base()}/v2/models/bag").json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]}
    reply = httpx.post(f"{text_server.base()}/v2/models/bag/infer", json=body).json()
    got = np.asarray(reply["outputs"][0]["data"], np.float32).reshape(reply["outputs"][0]["shape"])
    np.testing.assert_allclose(got, expected(TEXTS), rtol=1e-5, atol=1e-6)


def test_strings_over_grpc_with_tritonclient(text_server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(text_server.grpc_url)
    text = grpcclient.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"a dog ran", "the mat \u00e9t\u00e9".encode()], dtype=object))
    got = client.infer("bag", [text]).as_numpy("embedding")
    np.testing.assert_allclose(got, expected(["a dog ran", "the mat \u00e9t\u00e9"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [2, 3]}, "unexpected input"),
        ({"name": "text", "datatype": "INT64", "shape": [1], "data": [2]}, "datatype INT64"),
        ({"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["cat"]}, "rank"),
    ],
)
def test_token_inputs_and_wrong_types_are_refused(
    text_server: RunningServer, tensor: dict[str, object], message: str
) -> None:
    reply = httpx.post(f"{text_server.base()}/v2/models/bag/infer", json={"inputs": [tensor]})
    assert reply.status_code == 400
    assert message in reply.json()["error"]


def test_text_that_is_not_utf8_is_refused(text_server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(text_server.grpc_url)
    text = grpcclient.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"\xff\xfe cat"], dtype=object))
    with pytest.raises(Exception, match="UTF-8"):
        client.infer("bag", [text])


def test_a_tokenizer_on_a_graph_without_token_ids_is_a_clear_error(tmp_path: Path, mlp_onnx: Path) -> None:
    make_text_model(tmp_path)
    spec = {"name": "m", "model": {"format": "onnx", "path": str(mlp_onnx), "tokenizer": {"path": "tokenizer.json"}}}
    registry = LocalRegistry(tmp_path / "registry")
    with pytest.raises(ModelLoadError, match="no input_ids input"):
        build(load_spec(write_spec(tmp_path, spec)), registry)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"not a readable tokenizer\.json"):
        build(load_spec(write_spec(tmp_path, {**SPEC, "name": "bag"})), registry)
    assert registry.all_versions() == []


def test_embeddings_under_a_canary_read_the_schema_of_the_version_that_answers(tmp_path: Path) -> None:
    """Version 2 names its text input differently; half the versionless requests go to it. Each must be
    checked against the schema of the version that answers it, not the primary's."""
    make_text_model(tmp_path)
    registry = LocalRegistry(tmp_path / "registry")
    build(load_spec(write_spec(tmp_path, SPEC)), registry)
    renamed = {**SPEC, "model": {**SPEC["model"], "tokenizer": {"path": "tokenizer.json", "input": "sentence"}},
               "evaluation": {**SPEC["evaluation"], "dataset": {"kind": "npz", "path": "eval.npz",
                                                                "inputs": {"sentence": "text"}}}}  # fmt: skip
    build(load_spec(write_spec(tmp_path, renamed)), registry)
    server = start_server(registry, tmp_path / "server.log", "bag:1", "bag:2", extra_args=("--canary", "bag:2=50"))
    try:
        for _ in range(24):
            reply = httpx.post(f"{server.base()}/v1/embeddings", json={"model": "bag", "input": TEXTS[:2]})
            assert reply.status_code == 200, reply.text
            np.testing.assert_allclose([d["embedding"] for d in reply.json()["data"]], expected(TEXTS[:2]),
                                       rtol=1e-5)  # fmt: skip
        metrics = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    finally:
        assert stop_server(server) == 0
    for version in ("1", "2"):  # both answered (24 draws at 50 %: all on one side has odds of 2 in 16 million)
        series = f'shipyard_inference_requests_total{{model="bag",outcome="success",version="{version}"}}'
        assert any(line.startswith(series) and float(line.split()[-1]) > 0 for line in metrics.splitlines())
