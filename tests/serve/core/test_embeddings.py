"""OpenAI's embeddings route on a sentence-transformers folder (the real all-MiniLM-L6-v2), through the
official `openai` client: the vectors sentence-transformers itself computes."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from shipyard.pipeline import build
from shipyard.registry import LocalRegistry
from shipyard.spec import load_spec
from tests._helpers import write_spec
from tests.pipeline.test_huggingface import MINILM
from tests.serve.conftest import RunningServer, start_server, stop_server

TEXTS = ["The ship left the harbour at dawn.", "A storm passed far to the north.", "hello"]


@pytest.fixture(scope="module")
def embedding_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("embeddings")
    registry = LocalRegistry(folder / "registry")
    spec = {"name": "minilm", "model": {"format": "huggingface", "path": str(MINILM), "task": "feature-extraction",
                                        "dimensions": [384, 128]}}  # a spec may declare Matryoshka sizes  # fmt: skip
    build(load_spec(write_spec(folder, spec)), registry)
    running = start_server(registry, folder / "server.log", "minilm")
    yield running
    assert stop_server(running) == 0
    assert "Traceback" not in running.log.read_text()


def test_embeddings_equal_sentence_transformers(embedding_server: RunningServer) -> None:
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(MINILM), device="cpu").encode(TEXTS)
    with openai.OpenAI(base_url=f"{embedding_server.base()}/v1", api_key="none", max_retries=0) as client:
        reply = client.embeddings.create(model="minilm", input=TEXTS)
        single = client.embeddings.create(model="minilm:1", input=TEXTS[2])
        packed = client.embeddings.create(model="minilm", input=TEXTS[2], encoding_format="base64")
    got = np.array([item.embedding for item in reply.data])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [item.index for item in reply.data] == [0, 1, 2]
    tokens = SentenceTransformer(str(MINILM)).tokenizer(TEXTS)["input_ids"]
    assert reply.usage.prompt_tokens == sum(len(t) for t in tokens)
    np.testing.assert_allclose(single.data[0].embedding, expected[2], atol=1e-5)
    raw = packed.data[0].embedding
    assert isinstance(raw, str)
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(raw), dtype=np.float32), expected[2], atol=1e-5)


@pytest.mark.parametrize(
    ("body", "param"),
    [({"model": "minilm", "input": []}, "input"), ({"model": "minilm", "input": [1, 2]}, "input"),
     ({"model": "minilm", "input": "x", "encoding_format": "int8"}, "encoding_format"),
     ({"model": "minilm", "input": "x", "dimensions": 8}, "dimensions"),  # not a declared size: refused
     ({"model": "minilm", "input": "x", "frobnicate": 1}, "frobnicate"),
     ({"model": "nothing", "input": "x"}, None)],
)  # fmt: skip
def test_bad_embedding_requests_are_refused(embedding_server: RunningServer, body: dict[str, object],
                                            param: str | None) -> None:  # fmt: skip
    reply = httpx.post(f"{embedding_server.base()}/v1/embeddings", json=body)
    assert reply.status_code == (404 if param is None else 400), reply.text
    assert reply.json()["error"]["param"] == param


def test_dimensions_cut_and_renormalise_to_a_declared_size(embedding_server: RunningServer) -> None:
    with openai.OpenAI(base_url=f"{embedding_server.base()}/v1", api_key="none", max_retries=0) as client:
        full = np.array([d.embedding for d in client.embeddings.create(model="minilm", input=TEXTS).data])
        short = np.array([d.embedding for d in client.embeddings.create(model="minilm", input=TEXTS,
                                                                          dimensions=128).data])  # fmt: skip
    assert short.shape == (3, 128)
    expected = full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-6)


def test_completions_on_an_embedding_model_are_refused(embedding_server: RunningServer) -> None:
    for route, body in (
        ("completions", {"prompt": "x"}),
        ("chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ):
        reply = httpx.post(f"{embedding_server.base()}/v1/{route}", json={"model": "minilm", **body})
        assert reply.status_code == 400
        assert "not a language model: it embeds text, so use POST /v1/embeddings" in reply.json()["error"]["message"]
        assert reply.json()["error"]["param"] == "model"
