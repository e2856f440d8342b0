"""Language models: token streaming over SSE and gRPC ModelStreamInfer, and the key/value cache.

The decoder is the generation example's TinyGPT with random weights (tiny dims) and a word-level
tokenizer, built through the real pipeline. The reference is a greedy loop without any cache: the whole
sequence through the registered graph at every step.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from shipyard.pipeline import build
from shipyard.registry import LocalRegistry
from shipyard.spec import load_spec
from tests._helpers import make_decoder, write_spec
from tests.serve.conftest import RunningServer, start_server, stop_server

PROMPT = "the ship sails"


def greedy_without_cache(folder: Path, registry: LocalRegistry, prompt: str, steps: int) -> str:
    """The reference: the whole sequence through the registered graph at every step, no cache at all."""
    session = ort.InferenceSession(str(registry.path(registry.resolve("lm")) / "model.onnx"))
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = start = tokenizer.encode(prompt).ids
    for _ in range(steps):
        logits, _ = session.run(None, {"input_ids": np.array([ids]), "past": np.zeros((1, 2, 2, 0, 8), np.float32)})
        ids = [*ids, int(logits[0, -1].argmax())]
    return str(tokenizer.decode(ids[len(start) :]))


@pytest.fixture(scope="module")
def lm_registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LocalRegistry]:
    folder = tmp_path_factory.mktemp("lm")
    registry = LocalRegistry(folder / "registry")
    build(load_spec(write_spec(folder, make_decoder(folder))), registry)
    return folder, registry


@pytest.fixture(scope="module")
def lm_server(lm_registry: tuple[Path, LocalRegistry]) -> Iterator[tuple[RunningServer, str]]:
    folder, registry = lm_registry
    running = start_server(registry, folder / "server.log", "lm")
    yield running, greedy_without_cache(folder, registry, PROMPT, 12)
    assert stop_server(running) == 0
    assert "Traceback" not in running.log.read_text()


def test_generate_matches_a_greedy_loop_without_cache_and_computes_each_position_once(
    lm_server: tuple[RunningServer, str],
) -> None:
    server, expected = lm_server
    reply = httpx.post(f"{server.base()}/v2/models/lm/generate", json={"text_input": PROMPT, "max_tokens": 12})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["text_output"] == expected
    assert body["prompt_tokens"] == 3
    assert body["completion_tokens"] == 12
    # The prompt once (unless an earlier test left its cache), then only the newest token each step.
    assert body["computed_tokens"] in (3 + 12 - 1, 12 - 1)


def test_a_kept_prompt_cache_serves_requests_that_start_with_that_prompt(
    lm_server: tuple[RunningServer, str], lm_registry: tuple[Path, LocalRegistry]
) -> None:
    server, _ = lm_server
    prompts = ["dawn dusk crew", "dawn dusk crew", "dawn dusk crew salt"]  # used by no other test
    first, again, longer = (
        httpx.post(f"{server.base()}/v2/models/lm/generate", json={"text_input": p, "max_tokens": 6}).json()
        for p in prompts
    )
    assert first["computed_tokens"] == 3 + 6 - 1
    assert again["computed_tokens"] == 6 - 1  # the whole prompt came from the kept cache
    assert longer["computed_tokens"] == 1 + 6 - 1  # only "salt" was new
    assert first["text_output"] == again["text_output"] == greedy_without_cache(*lm_registry, prompts[0], 6)
    assert longer["text_output"] == greedy_without_cache(*lm_registry, prompts[2], 6)


def test_sse_stream_sends_one_event_per_token_then_a_final_one(lm_server: tuple[RunningServer, str]) -> None:
    server, expected = lm_server
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 12}}
    with httpx.stream("POST", f"{server.base()}/v2/models/lm/generate_stream", json=body) as response:
        assert response.headers["content-type"] == "text/event-stream"
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    *pieces, final = events
    assert final["final"] is True
    assert final["completion_tokens"] == 12
    assert len(pieces) == 12
    assert "".join(e["text_output"] for e in pieces) == expected


def test_grpc_stream_is_decoupled_with_a_final_flag(lm_server: tuple[RunningServer, str]) -> None:
    server, expected = lm_server
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
    try:
        for empty_final in (False, True):
            client.async_stream_infer("lm", [text], parameters={"max_tokens": 12},
                                      enable_empty_final_response=empty_final)  # fmt: skip
            pieces, finals = [], []
            while not finals or not finals[-1]:
                result, error = answers.get(timeout=30)
                assert error is None
                output = result.as_numpy("text_output")
                pieces += [] if output is None else [output[0].decode()]
                finals.append(result.get_response().parameters["triton_final_response"].bool_param)
            assert "".join(pieces) == expected
            assert len(finals) == (13 if empty_final else 12)  # the empty final answer only when asked for
    finally:
        client.stop_stream()


def test_concurrent_generations_keep_their_own_caches(lm_server: tuple[RunningServer, str]) -> None:
    server, expected = lm_server
    body = {"text_input": PROMPT, "max_tokens": 12}
    with ThreadPoolExecutor(max_workers=6) as pool:
        replies = list(pool.map(lambda _: httpx.post(f"{server.base()}/v2/models/lm/generate", json=body), range(12)))
    assert [r.json()["text_output"] for r in replies] == [expected] * 12


def _sample(server: RunningServer, series: str) -> float:
    """A series' value on the metrics endpoint (0 before it first appears)."""
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(series + " ")), 0.0)


def test_metrics_count_generated_tokens_and_time_to_first_token(lm_server: tuple[RunningServer, str]) -> None:
    server, _ = lm_server
    series = ['shipyard_generated_tokens_total{model="lm",version="1"}',
              'shipyard_time_to_first_token_seconds_count{model="lm",version="1"}']  # fmt: skip
    before = [_sample(server, s) for s in series]
    httpx.post(f"{server.base()}/v2/models/lm/generate", json={"text_input": PROMPT, "max_tokens": 12})
    after = [_sample(server, s) for s in series]
    assert [a - b for a, b in zip(after, before, strict=True)] == [12, 1]


def test_infer_on_a_language_model_returns_the_whole_text(lm_server: tuple[RunningServer, str]) -> None:
    server, expected = lm_server
    client = grpcclient.InferenceServerClient(server.grpc_url)
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
    got = client.infer("lm", [text], parameters={"max_tokens": 12}).as_numpy("text_output")
    assert got[0].decode() == expected


def test_sampling_with_a_seed_repeats(lm_server: tuple[RunningServer, str]) -> None:
    server, _ = lm_server
    body = {"text_input": PROMPT, "temperature": 1.5, "seed": 7}
    first, second = (httpx.post(f"{server.base()}/v2/models/lm/generate", json=body).json() for _ in range(2))
    assert first["text_output"] == second["text_output"]
    assert first["completion_tokens"] == 24  # the spec's max_new_tokens: it sets no end token


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"text_input": ""}, "empty"),
        ({"text_input": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"text_input": PROMPT, "max_tokens": 25}, "max_tokens"),
        ({"text_input": PROMPT, "temperature": "hot"}, "temperature"),
        ({"text_input": PROMPT, "top_k": 3}, "unknown fields"),
        ({"text_input": 5}, "text_input"),
        ({"text_input": " ".join(["salt"] * 64)}, "context"),
    ],
)
def test_bad_generate_requests_are_refused_before_streaming(
    lm_server: tuple[RunningServer, str], body: dict[str, Any], message: str
) -> None:
    server, _ = lm_server
    for route in ("generate", "generate_stream"):
        reply = httpx.post(f"{server.base()}/v2/models/lm/{route}", json=body)
        assert reply.status_code == 400
        assert message in reply.json()["error"]


def test_generate_on_a_model_that_is_not_a_language_model_is_refused(server: RunningServer) -> None:
    for route in ("generate", "generate_stream"):
        reply = httpx.post(f"{server.base()}/v2/models/mlp/{route}", json={"text_input": "hello"})
        assert reply.status_code == 400
        assert "not a language model" in reply.json()["error"]


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_generate_bodies = st.fixed_dictionaries(
    {},
    optional={"text_input": _json_values | st.text(max_size=80), "max_tokens": _json_values,
              "temperature": _json_values, "seed": _json_values, "parameters": _json_values, "id": _json_values},
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(body=_generate_bodies | _json_values)
def test_random_generate_bodies_never_cause_a_5xx(lm_server: tuple[RunningServer, str], body: Any) -> None:
    server, _ = lm_server
    for route in ("generate", "generate_stream"):
        reply = httpx.post(f"{server.base()}/v2/models/lm/{route}", json=body, timeout=30)
        assert reply.status_code in (200, 400), (body, reply.text)
        if reply.status_code == 400:
            assert isinstance(reply.json()["error"], str)
        elif route == "generate_stream":  # a stream that started must not end in an error event
            assert '"error"' not in reply.text, (body, reply.text)
