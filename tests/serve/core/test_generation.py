"""Language models on the server: the OpenAI API (the official `openai` client), Triton's generate routes,
gRPC token streaming, continuous batching, the prefix cache, overload and disconnects.

The model is a random-initialised tiny Llama saved with `save_pretrained` and built through the real
pipeline. The reference is transformers' own greedy `generate()` on that folder.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import queue
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import given, settings
from hypothesis import strategies as st

from shipyard.pipeline import build
from shipyard.registry import LocalRegistry
from shipyard.serve.policy.auth import add_token
from shipyard.spec import load_spec
from tests._helpers import CHAT_TEMPLATE, WORDS, causal_spec, make_hf_causal, write_spec
from tests.serve.conftest import RunningServer, start_server, stop_server

PROMPT = "the ship sails"
PROMPTS = ["the ship sails", "north wind", "dawn at sea with crew", "salt", "storm calm sky rain", "the port",
           "dusk harbour", "rain rain rain", "crew sails south", "the sea", "calm", "wind sky", "ship ship",
           "at dusk the storm", "harbour port sea", "sky"]  # fmt: skip


def greedy(folder: Path, prompt: str, steps: int, templated: bool = False) -> str:
    """transformers' greedy generate() on the Hugging Face folder: what the server must return. A raw prompt
    gets the tokenizer's own special tokens (its BOS), one a chat template rendered gets none."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer(prompt, add_special_tokens=not templated, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))  # as OpenAI servers do


@pytest.fixture(scope="module")
def lm_registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LocalRegistry]:
    folder = tmp_path_factory.mktemp("lm")
    make_hf_causal(folder / "hf", bos=True)  # its tokenizer puts a BOS before raw text, as Llama's does
    registry = LocalRegistry(folder / "registry")
    build(load_spec(write_spec(folder, causal_spec(max_running=8, max_waiting=64))), registry)
    return folder, registry


@pytest.fixture(scope="module")
def lm_server(lm_registry: tuple[Path, LocalRegistry]) -> Iterator[tuple[RunningServer, str]]:
    folder, registry = lm_registry
    running = start_server(registry, folder / "server.log", "lm")
    yield running, greedy(folder / "hf", PROMPT, 12)
    while _clients:
        _clients.pop().close()
    assert stop_server(running) == 0
    assert "Traceback" not in running.log.read_text()


_clients: list[openai.OpenAI] = []


def _client(server: RunningServer) -> openai.OpenAI:
    """One client per server, closed when the module's server stops (an unclosed one leaks its sockets)."""
    for client in _clients:
        if str(client.base_url).startswith(server.base()):
            return client
    _clients.append(openai.OpenAI(base_url=f"{server.base()}/v1", api_key="none", max_retries=0))
    return _clients[-1]


def test_openai_completions_and_models_with_the_official_client(
    lm_server: tuple[RunningServer, str], lm_registry: tuple[Path, LocalRegistry]
) -> None:
    server, expected = lm_server
    client = _client(server)
    models = client.models.list().data
    assert [m.id for m in models] == ["lm"]  # one id per model; pinned ones work without being listed
    built = datetime.datetime.fromisoformat(lm_registry[1].manifest("lm:1").created_at)
    assert models[0].created == int(built.timestamp())  # when the version was built, not when asked
    assert client.models.retrieve("lm:1").id == "lm:1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nothing")
    reply = client.completions.create(model="lm", prompt=PROMPT, max_tokens=12)
    assert reply.choices[0].text == expected
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    # BOS and three words, as transformers' tokenizer gives them (`expected` is its generate() on them)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (4, 12, 16)
    pinned = client.completions.create(model="lm:1", prompt=PROMPT, max_tokens=12)
    assert pinned.choices[0].text == expected
    # A prompt that already begins with the BOS gets no second one.
    again = client.completions.create(model="lm", prompt="<eos> " + PROMPT, max_tokens=12)
    assert again.choices[0].text == expected
    assert again.usage is not None
    assert again.usage.prompt_tokens == 4


def test_the_end_token_counts_as_a_completion_token(lm_server: tuple[RunningServer, str]) -> None:
    """A generation that ends on the end token counts it, as transformers, vLLM and llama.cpp do: the same
    seeded request ends with "stop" when `max_tokens` is its count, and with "length" one token before."""
    client = _client(lm_server[0])

    def run(seed: int, max_tokens: int) -> tuple[str | None, int]:
        reply = client.completions.create(model="lm", prompt=PROMPT, max_tokens=max_tokens, temperature=2, seed=seed)
        assert reply.usage is not None
        return reply.choices[0].finish_reason, reply.usage.completion_tokens

    ended = next((seed, tokens) for seed in range(60) for finish, tokens in [run(seed, 24)] if finish == "stop")
    seed, tokens = ended
    assert run(seed, tokens) == ("stop", tokens)
    if tokens > 1:
        assert run(seed, tokens - 1) == ("length", tokens - 1)
    # ignore_eos (vLLM's extension, for benchmarks): the same request runs to max_tokens.
    reply = client.completions.create(model="lm", prompt=PROMPT, max_tokens=24, temperature=2, seed=seed,
                                      extra_body={"ignore_eos": True})  # fmt: skip
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 24


def test_openai_chat_uses_the_models_chat_template(
    lm_server: tuple[RunningServer, str], lm_registry: tuple[Path, LocalRegistry]
) -> None:
    server, _ = lm_server
    messages: Any = [{"role": "system", "content": "the crew"}, {"role": "user", "content": "the ship sails"}]
    reply = _client(server).chat.completions.create(model="lm", messages=messages, max_completion_tokens=10)
    # The template renders "system : the crew ; user : the ship sails ; assistant :"
    rendered = "system : the crew ; user : the ship sails ; assistant :"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == greedy(lm_registry[0] / "hf", rendered, 10, templated=True)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(rendered.split())


def test_openai_streaming_chat_ends_with_usage_and_done(lm_server: tuple[RunningServer, str]) -> None:
    server, _ = lm_server
    client = _client(server)
    messages: Any = [{"role": "user", "content": "north wind"}]
    whole = client.chat.completions.create(model="lm", messages=messages, max_tokens=8)
    chunks = list(client.chat.completions.create(model="lm", messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8
    body = {"model": "lm", "prompt": "north wind", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.base()}/v1/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_sixteen_concurrent_streams_return_what_each_gives_alone(lm_server: tuple[RunningServer, str]) -> None:
    """No cross-talk between the sequences of a batch: greedy answers equal the one-at-a-time ones."""
    server, _ = lm_server
    client = _client(server)
    alone = [client.completions.create(model="lm", prompt=p, max_tokens=16).choices[0].text for p in PROMPTS]

    async def together() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.base()}/v1", api_key="none", max_retries=0) as concurrent:

            async def one(prompt: str) -> str:
                stream = await concurrent.completions.create(model="lm", prompt=prompt, max_tokens=16, stream=True)
                return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

            return list(await asyncio.gather(*(one(p) for p in PROMPTS)))

    before = _sample(server, 'shipyard_batch_size_sum{model="lm",version="1"}')
    steps_before = _sample(server, 'shipyard_batch_size_count{model="lm",version="1"}')
    assert asyncio.run(together()) == alone
    sequences = _sample(server, 'shipyard_batch_size_sum{model="lm",version="1"}') - before
    steps = _sample(server, 'shipyard_batch_size_count{model="lm",version="1"}') - steps_before
    assert sequences / steps > 2  # the decode steps really ran several sequences at once


def test_the_v2_generate_routes_and_the_prefix_cache(lm_server: tuple[RunningServer, str]) -> None:
    server, expected = lm_server
    prompt = "dawn dusk crew salt"  # used by no other test
    first, again = (httpx.post(f"{server.base()}/v2/models/lm/generate",
                               json={"text_input": prompt, "max_tokens": 6}).json() for _ in range(2))  # fmt: skip
    assert first["computed_tokens"] == 5  # the tokenizer's BOS and four words
    assert again["computed_tokens"] == 1  # the kept cache covered all but the last prompt position
    assert first["text_output"] == again["text_output"]
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 12}}
    with httpx.stream("POST", f"{server.base()}/v2/models/lm/generate_stream", json=body) as response:
        assert response.headers["content-type"] == "text/event-stream"
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    *pieces, final = events
    assert final["final"] is True
    assert final["completion_tokens"] == 12
    assert "".join(e["text_output"] for e in pieces) == expected


def test_a_prompt_that_shares_a_kept_prompts_start_reuses_its_whole_blocks(
    lm_registry: tuple[Path, LocalRegistry], lm_server: tuple[RunningServer, str]
) -> None:
    """Two prompts with the same 20-word start (a shared system prompt) and different ends: the second
    computes only what follows the shared whole blocks of 16 positions, and answers as from scratch."""
    server, _ = lm_server
    # BOS + 20 words: 21 shared positions, one whole block (a start no other test's prompt has)
    system = " ".join(["salt", ";", "salt", ":", *reversed(WORDS[2:18])])
    first, second = f"{system} north south sky", f"{system} harbour port"
    key = '{model="lm",version="1"}'
    reused = _sample(server, f"shipyard_prompt_tokens_reused_total{key}")
    answers = [httpx.post(f"{server.base()}/v2/models/lm/generate", json={"text_input": p, "max_tokens": 6}).json()
               for p in (first, second)]  # fmt: skip
    # The first may extend a short prompt another test left in the cache; the second shares a block with it.
    earlier = 24 - answers[0]["computed_tokens"]
    assert earlier < 16
    assert answers[1]["computed_tokens"] == 23 - 16
    assert answers[1]["text_output"] == greedy(lm_registry[0] / "hf", second, 6)
    assert _sample(server, f"shipyard_prompt_tokens_reused_total{key}") - reused == earlier + 16


def test_the_generate_route_takes_the_fields_the_readme_lists(lm_server: tuple[RunningServer, str]) -> None:
    server, expected = lm_server
    stop = " " + expected.split()[2]
    body = {"text_input": PROMPT, "max_tokens": 12, "top_p": 1.0, "stop": stop}
    reply = httpx.post(f"{server.base()}/v2/models/lm/generate", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["text_output"] == expected[: expected.index(stop)]


def test_grpc_stream_is_decoupled_with_a_final_flag(lm_server: tuple[RunningServer, str]) -> None:
    server, expected = lm_server
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
    try:
        answered = {}
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
            assert not any(finals[:-1])
            answered[empty_final] = len(finals), len(pieces)
        assert answered[True][0] == answered[False][0] + 1  # the empty final answer only when asked for
        assert answered[True][1] == answered[False][1]
    finally:
        client.stop_stream()
    whole = client.infer("lm", [text], parameters={"max_tokens": 12}).as_numpy("text_output")
    assert whole[0].decode() == expected


def _sample(server: RunningServer, series: str) -> float:
    """A series' value on the metrics endpoint (0 before it first appears)."""
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(series + " ")), 0.0)


def test_token_metrics(lm_server: tuple[RunningServer, str]) -> None:
    server, _ = lm_server
    key = '{model="lm",version="1"}'
    series = [f"shipyard_generated_tokens_total{key}", f"shipyard_prompt_tokens_total{key}",
              f"shipyard_time_to_first_token_seconds_count{key}", f"shipyard_inter_token_latency_seconds_count{key}",
              f"shipyard_queue_duration_seconds_count{key}"]  # fmt: skip
    before = [_sample(server, s) for s in series]
    _client(server).completions.create(model="lm", prompt=PROMPT, max_tokens=12)
    after = [_sample(server, s) for s in series]
    assert [a - b for a, b in zip(after, before, strict=True)] == [12, 4, 1, 11, 1]
    for gauge in ("shipyard_sequences_running", "shipyard_sequences_waiting", "shipyard_kv_cache_usage_ratio"):
        assert _sample(server, gauge + key) == 0


def test_sampling_with_a_seed_repeats(lm_server: tuple[RunningServer, str]) -> None:
    server, _ = lm_server
    client = _client(server)
    first, second, other = (
        client.completions.create(model="lm", prompt=PROMPT, max_tokens=20, temperature=1.5, top_p=0.9, seed=seed)
        .choices[0].text for seed in (7, 7, 8)
    )  # fmt: skip
    assert first == second
    assert first != other


@pytest.mark.parametrize(
    ("route", "body", "status", "param", "code"),
    [
        ("completions", {"model": "lm", "prompt": " ".join(["salt"] * 200)}, 400, "prompt", "context_length_exceeded"),
        ("completions", {"model": "lm", "prompt": PROMPT, "max_tokens": 25}, 400, "max_tokens",
         "context_length_exceeded"),
        ("completions", {"model": "lm", "prompt": PROMPT, "temperature": -1}, 400, "temperature", None),
        ("completions", {"model": "lm", "prompt": PROMPT, "n": 9}, 400, "n", None),  # more than max_running
        ("completions", {"model": "lm", "prompt": PROMPT, "logprobs": 6}, 400, "logprobs", None),  # OpenAI: 0..5
        ("completions", {"model": "nope", "prompt": PROMPT}, 404, None, "model_not_found"),
        ("completions", {"model": "lm@nothing", "prompt": PROMPT}, 404, "model", "model_not_found"),
        ("chat/completions", {"model": "lm", "messages": [{"role": "captain", "content": "hi"}]}, 400,
         "messages[0].role", None),
        ("chat/completions", {"model": "lm", "messages": []}, 400, "messages", None),
        ("chat/completions", {"model": "lm", "messages": [{"role": "user", "content": 5}]}, 400,
         "messages[0].content", None),
        ("embeddings", {"model": "lm", "input": "hi"}, 400, "model", None),
        # Hostile values: each a 400 naming the field, never a 500 or a stalled server.
        ("completions", {"model": "lm", "prompt": PROMPT, "stop": "x" * 300_000}, 400, "stop[0]", None),
        ("completions", {"model": "lm", "prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
        ("chat/completions", {"model": "lm", "messages": [{"role": {"a": 1}, "content": "hi"}]}, 400,
         "messages[0].role", None),
        ("chat/completions", {"model": "lm", "messages": [{"role": ["user"], "content": "hi"}]}, 400,
         "messages[0].role", None),
        ("chat/completions", {"model": "lm", "messages": [{"role": "user", "content": "sea"}] * 4097}, 400,
         "messages", None),
    ],
)  # fmt: skip
def test_bad_openai_requests_get_openai_shaped_errors(
    lm_server: tuple[RunningServer, str], route: str, body: dict[str, Any], status: int, param: str | None,
    code: str | None,
) -> None:  # fmt: skip
    server, expected = lm_server
    reply = httpx.post(f"{server.base()}/v1/{route}", json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    # Nothing else changed: the server answers as before.
    assert _client(server).completions.create(model="lm", prompt=PROMPT, max_tokens=12).choices[0].text == expected


@pytest.mark.parametrize(("route", "field"), [("completions", "max_tokens"), ("completions", "temperature"),
                                              ("chat/completions", "top_p"), ("completions", "seed")])  # fmt: skip
def test_deeply_nested_values_are_a_400_naming_the_field(
    lm_server: tuple[RunningServer, str], route: str, field: str
) -> None:
    """1,000 levels of arrays (JSON parsers allow about 1,024): the error message shows a bounded part."""
    prompt = '"messages": [{"role": "user", "content": "sea"}]' if "chat" in route else f'"prompt": "{PROMPT}"'
    body = f'{{"model": "lm", {prompt}, "{field}": {"[" * 1000}{"]" * 1000}}}'
    reply = httpx.post(f"{lm_server[0].base()}/v1/{route}", content=body.encode())
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == field
    assert len(reply.text) < 1000


@pytest.mark.parametrize(
    ("route", "extra", "param"),
    [
        ("completions", {"frobnicate": 1}, "frobnicate"),
        ("chat/completions", {"frobnicate": 1}, "frobnicate"),
        ("completions", {"echo": True, "logprobs": 1}, "echo"),
        ("completions", {"best_of": 2, "n": 3}, "best_of"),
        ("completions", {"best_of": 2, "stream": True}, "best_of"),
        ("completions", {"best_of": 9}, "best_of"),  # more than the model decodes together
        ("completions", {"suffix": "the end"}, "suffix"),  # this model has no fill-in-the-middle tokens
        ("chat/completions", {"tool_choice": "auto"}, "tool_choice"),
        # This model's template shows no tools: refused rather than answered as if there were none.
        ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("chat/completions", {"top_logprobs": 0}, "top_logprobs"),
        ("chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("chat/completions", {"presence_penalty": 2.5}, "presence_penalty"),
        ("completions", {"frequency_penalty": -3}, "frequency_penalty"),
        ("completions", {"logit_bias": {"3": 101}}, "logit_bias[3]"),
        ("completions", {"temperature": "1"}, "temperature"),
        ("completions", {"max_tokens": True}, "max_tokens"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi", "mood": "sunny"}]}, "messages[0].mood"),
    ],
)  # fmt: skip
def test_every_field_is_honoured_or_refused_by_name(
    lm_server: tuple[RunningServer, str], route: str, extra: dict[str, Any], param: str
) -> None:
    """OpenAI answers 400 for what it does not take; so does this server, naming the field, instead of a 200
    that quietly ignored it."""
    body: dict[str, Any] = {"model": "lm", "max_tokens": 2}
    body.update({"messages": [{"role": "user", "content": "sea"}]} if "chat" in route else {"prompt": PROMPT})
    reply = httpx.post(f"{lm_server[0].base()}/v1/{route}", json={**body, **extra})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    advisory = {"user": "u-1", "metadata": {"team": "a"}, "store": False, "n": 1, "echo": False}
    if "chat" in route:
        advisory = {"user": "u-1", "metadata": {"team": "a"}, "store": False, "n": 1, "parallel_tool_calls": True}
    assert httpx.post(f"{lm_server[0].base()}/v1/{route}", json={**body, **advisory}).status_code == 200


def test_sampling_fields_are_honoured(lm_server: tuple[RunningServer, str]) -> None:
    server, expected = lm_server
    client = _client(server)

    def text(**fields: Any) -> tuple[str, str | None]:
        reply = client.completions.create(model="lm", prompt=PROMPT, max_tokens=12, **fields)
        return reply.choices[0].text, reply.choices[0].finish_reason

    # The folder's generation_config.json has no do_sample: greedy by default, whatever the seed.
    assert text(seed=5) == (expected, "length")
    # top_k 1 and min_p 1 leave only the most likely token: greedy even at temperature 2.
    assert text(temperature=2, seed=1, extra_body={"top_k": 1}) == (expected, "length")
    assert text(temperature=2, seed=1, extra_body={"min_p": 1.0}) == (expected, "length")
    # logit_bias: +100 on "sea" makes it every token.
    assert text(logit_bias={str(WORDS.index("sea")): 100})[0] == " ".join(["sea"] * 12)
    # Penalties: the plain greedy text repeats words; with a presence penalty none repeats.
    assert len(set(expected.split())) < len(expected.split())
    penalised = text(presence_penalty=2.0)[0].split()
    assert len(set(penalised)) == len(penalised) >= 8  # (a special token, such as <unk>, shows no word)
    assert text(frequency_penalty=2.0)[0] != expected
    assert text(extra_body={"repetition_penalty": 5.0})[0] != expected
    # stop_token_ids: a token of the greedy text ends it there (finish "stop"), counted as generated.
    words = expected.split()
    cut = client.completions.create(model="lm", prompt=PROMPT, max_tokens=12,
                                    extra_body={"stop_token_ids": [WORDS.index(words[3])]})  # fmt: skip
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (" ".join(words[:3]), "stop")
    assert cut.usage is not None
    assert cut.usage.completion_tokens == 4
    # min_tokens holds a stop token back until that many are out.
    late = text(extra_body={"stop_token_ids": [WORDS.index(words[3])], "min_tokens": 5})[0].split()
    assert late[:3] == words[:3]
    assert len(late) >= 5  # the stop token was not drawn at the fourth step: another word came
    assert late[3] != words[3]


def test_echo_and_best_of(lm_server: tuple[RunningServer, str]) -> None:
    server, expected = lm_server
    client = _client(server)
    assert client.completions.create(model="lm", prompt=PROMPT, max_tokens=12, echo=True).choices[0].text == (
        PROMPT + expected)  # fmt: skip
    streamed = client.completions.create(model="lm", prompt=PROMPT, max_tokens=12, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == PROMPT + expected
    # best_of 3: the three candidates of n=3 with the same seed, and the one with the highest summed logprob wins.
    fields: Any = {"model": "lm", "prompt": PROMPT, "max_tokens": 6, "temperature": 1.5, "seed": 5}
    candidates = client.completions.create(**fields, n=3, logprobs=0).choices
    scores = {c.text: sum(c.logprobs.token_logprobs or []) for c in candidates if c.logprobs}
    best = client.completions.create(**fields, best_of=3)
    assert len(best.choices) == 1
    assert best.choices[0].text == max(scores, key=lambda text: scores[text])
    assert best.choices[0].logprobs is None  # not asked for
    assert best.usage is not None
    assert best.usage.completion_tokens == 18  # every candidate's tokens, as OpenAI counts them


def test_logprobs_are_the_models_own_and_stream_as_they_come(
    lm_server: tuple[RunningServer, str], lm_registry: tuple[Path, LocalRegistry]
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    client = _client(lm_server[0])
    messages: Any = [{"role": "user", "content": "north wind"}]
    reply = client.chat.completions.create(model="lm", messages=messages, max_tokens=6, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content if reply.choices[0].logprobs else None
    assert content is not None
    assert reply.usage is not None
    assert len(content) == reply.usage.completion_tokens == 6
    for entry in content:  # greedy: the drawn token is the most likely one, and the alternatives come sorted
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (entry.token, entry.logprob)
        assert sum(np.exp(t.logprob) for t in entry.top_logprobs) <= 1.0 + 1e-6
        assert entry.bytes == list(entry.token.encode())
    # The first token's logprobs equal a softmax of the model's own logits for the rendered prompt.
    model = AutoModelForCausalLM.from_pretrained(lm_registry[0] / "hf").eval()
    ids = [WORDS.index(w) for w in ["user", ":", "north", "wind", ";", "assistant", ":"]]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double().numpy()
    expected = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    best = np.argsort(-expected)[:3]
    assert [t.token for t in content[0].top_logprobs] == [WORDS[i] for i in best]
    np.testing.assert_allclose([t.logprob for t in content[0].top_logprobs], expected[best], atol=1e-4)
    # Streamed, each chunk carries the logprobs of its tokens: together, the same list.
    chunks = client.chat.completions.create(model="lm", messages=messages, max_tokens=6, logprobs=True,
                                            top_logprobs=3, stream=True)  # fmt: skip
    streamed = [e for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content or []]  # fmt: skip
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]
    # The completions API's shape: parallel lists, top alternatives as {token: logprob}.
    legacy = client.completions.create(model="lm", prompt=PROMPT, max_tokens=4, logprobs=2).choices[0].logprobs
    assert legacy is not None
    assert legacy.tokens is not None
    assert legacy.token_logprobs is not None
    assert legacy.top_logprobs is not None
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs) == 4
    assert all(len(top) == 2 for top in legacy.top_logprobs)
    # V2 generate has no place for them: refused, not ignored.
    reply_v2 = httpx.post(f"{lm_server[0].base()}/v2/models/lm/generate",
                          json={"text_input": PROMPT, "parameters": {"logprobs": 2}})  # fmt: skip
    assert reply_v2.status_code == 400
    assert "logprobs are returned on the OpenAI routes" in reply_v2.json()["error"]


def test_a_body_that_is_not_utf8_json_is_refused(lm_server: tuple[RunningServer, str]) -> None:
    server, _ = lm_server
    reply = httpx.post(f"{server.base()}/v1/completions", content=b'{"model": "lm", "prompt": "\xff\xfe"}')
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="this model decodes at most 8 sequences together"):
        _client(server).completions.create(model="lm", prompt=PROMPT, n=9)


def test_n_choices_share_one_prompt_and_repeat_with_a_seed(lm_server: tuple[RunningServer, str]) -> None:
    client = _client(lm_server[0])
    messages: Any = [{"role": "user", "content": "north wind"}]

    def chat(**fields: Any) -> Any:
        return client.chat.completions.create(model="lm", messages=messages, max_tokens=8, n=3, temperature=1.5,
                                              seed=11, **fields)  # fmt: skip

    first, again = chat(), chat()
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # reproducible with the seed
    assert len(set(texts)) == 3  # each choice draws with its own seed (11, 12, 13)
    assert first.usage is not None
    assert first.usage.prompt_tokens == 7  # "user : north wind ; assistant :", counted once
    assert sum(len(t.split()) for t in texts) <= first.usage.completion_tokens <= 3 * 8  # every choice's tokens
    # Streamed, the choices interleave by index and add up to the same texts.
    streamed: dict[int, str] = {0: "", 1: "", 2: ""}
    finishes = {}
    for chunk in chat(stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert [streamed[i] for i in range(3)] == texts
    assert finishes == {c.index: c.finish_reason for c in first.choices}


@pytest.fixture(scope="module")
def narrow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One cache slot and a waiting queue of one, and room for 500 new tokens per request."""
    folder = tmp_path_factory.mktemp("narrow")
    make_hf_causal(folder / "hf", context=512)
    # A template that compiles but fails on some input, as a careless one can (1/0, str + int, recursion).
    config = json.loads((folder / "hf" / "tokenizer_config.json").read_text())
    template = ("{% if messages[0]['content'] == 'divide' %}{{ 1 / 0 }}{% endif %}"
                "{% if messages[0]['content'] == 'add' %}{{ 'a' + 1 }}{% endif %}"
                "{% if messages[0]['content'] == 'slow' %}{% for i in range(3000) %}{% for j in range(1000) %}"
                "{% endfor %}{% endfor %}{% endif %}" + CHAT_TEMPLATE)  # fmt: skip
    (folder / "hf" / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "hf" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    registry = LocalRegistry(folder / "registry")
    build(load_spec(write_spec(folder, causal_spec("narrow", max_running=1, max_waiting=1, max_new_tokens=500))),
          registry)  # fmt: skip
    running = start_server(registry, folder / "server.log", "narrow")
    yield running
    assert stop_server(running) == 0
    assert "Traceback" not in running.log.read_text()


def test_overload_is_a_quick_429(narrow_server: RunningServer) -> None:
    """A burst of 12 requests on one slot and one waiting place: the ones that find both taken are refused at
    once; the others return the whole answer."""
    server = narrow_server
    body = {"model": "narrow", "prompt": PROMPT, "max_tokens": 400}

    def post(_: int) -> tuple[int, float, dict[str, Any]]:
        start = time.perf_counter()
        reply = httpx.post(f"{server.base()}/v1/completions", json=body, timeout=60)
        return reply.status_code, time.perf_counter() - start, reply.json()

    with ThreadPoolExecutor(max_workers=12) as pool:
        replies = list(pool.map(post, range(12)))
    refused = [(seconds, answer) for status, seconds, answer in replies if status == 429]
    served = [answer for status, _, answer in replies if status == 200]
    assert len(refused) + len(served) == 12
    assert refused, "nothing was refused: the burst never found the queue full"
    assert served
    assert max(seconds for seconds, _ in refused) < 1.0
    assert {answer["error"]["type"] for _, answer in refused} == {"rate_limit_error"}
    assert {answer["usage"]["completion_tokens"] for answer in served} == {400}


def test_an_empty_prompt_is_refused_only_when_it_has_no_tokens(
    narrow_server: RunningServer, lm_server: tuple[RunningServer, str]
) -> None:
    """Without a BOS there is nothing to continue; with one (the tokenizer adds it) the model starts from it."""
    reply = httpx.post(f"{narrow_server.base()}/v1/completions", json={"model": "narrow", "prompt": ""})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "prompt"
    reply = httpx.post(f"{lm_server[0].base()}/v1/completions", json={"model": "lm", "prompt": "", "max_tokens": 2})
    assert reply.status_code == 200
    assert reply.json()["usage"]["prompt_tokens"] == 1


@pytest.mark.parametrize("content", ["divide", "add"])
def test_a_chat_template_that_fails_on_the_messages_is_that_requests_400(
    narrow_server: RunningServer, content: str
) -> None:
    body = {"model": "narrow", "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    reply = httpx.post(f"{narrow_server.base()}/v1/chat/completions", json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "messages"
    assert "the chat template failed on the messages" in reply.json()["error"]["message"]
    body["messages"] = [{"role": "user", "content": "sea"}]
    assert httpx.post(f"{narrow_server.base()}/v1/chat/completions", json=body).status_code == 200


def _health_while(server: RunningServer, request: Any) -> tuple[httpx.Response, list[float]]:
    """Run `request` (a function of an httpx.Client) in a thread; probe readiness until it answers."""
    with httpx.Client(base_url=server.base(), timeout=60) as probe, ThreadPoolExecutor(1) as pool:
        assert probe.get("/v2/health/ready").status_code == 200  # connected before the request starts
        with httpx.Client(base_url=server.base(), timeout=60) as client:
            pending = pool.submit(request, client)
            probes = []
            while not pending.done():
                before = time.perf_counter()
                assert probe.get("/v2/health/ready").status_code == 200
                probes.append(time.perf_counter() - before)
                time.sleep(0.02)
            return pending.result(), probes


def test_slow_templates_and_huge_prompts_never_stall_the_server(narrow_server: RunningServer) -> None:
    """A template that loops three million times, and a 0.9 MB prompt (400 once tokenized: beyond the
    context): both run off the event loop, so readiness answers within 100 ms while they do."""
    chat = {"model": "narrow", "messages": [{"role": "user", "content": "slow"}], "max_tokens": 2}
    reply, probes = _health_while(narrow_server, lambda c: c.post("/v1/chat/completions", json=chat))
    assert reply.status_code == 200, reply.text
    assert probes
    assert max(probes) < 0.1, probes
    huge = {"model": "narrow", "prompt": "sea " * 225_000, "max_tokens": 2}
    reply, probes = _health_while(narrow_server, lambda c: c.post("/v1/completions", json=huge))
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "context_length_exceeded"
    assert max(probes, default=0.0) < 0.1, probes


def test_a_client_that_disconnects_mid_stream_frees_its_slot(narrow_server: RunningServer) -> None:
    server = narrow_server
    steps = 'shipyard_batch_size_count{model="narrow",version="1"}'
    before = _sample(server, steps)
    body = {"model": "narrow", "prompt": PROMPT, "max_tokens": 500, "stream": True}
    with httpx.stream("POST", f"{server.base()}/v1/completions", json=body, timeout=30) as response:
        next(response.iter_lines())  # the first token arrived; then the client goes away
    _wait_for(lambda: _running(server, "narrow") == 0)
    time.sleep(0.2)
    assert _sample(server, steps) - before < 499  # it stopped decoding long before max_tokens
    reply = httpx.post(f"{server.base()}/v1/completions", json={**body, "stream": False, "max_tokens": 5})
    assert reply.status_code == 200
    assert reply.json()["usage"]["completion_tokens"] == 5


def _running(server: RunningServer, model: str) -> float:
    return _sample(server, f'shipyard_sequences_running{{model="{model}",version="1"}}')


def _wait_for(condition: Any, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_generate_on_a_model_that_is_not_a_language_model_is_refused(server: RunningServer) -> None:
    for route in ("generate", "generate_stream"):
        reply = httpx.post(f"{server.base()}/v2/models/mlp/{route}", json={"text_input": "hello"})
        assert reply.status_code == 400
        assert "not a language model" in reply.json()["error"]
    reply = httpx.post(f"{server.base()}/v1/completions", json={"model": "mlp", "prompt": "hello"})
    assert reply.status_code == 400
    assert "not a language model" in reply.json()["error"]["message"]


def test_workers_auto_serves_a_language_model_from_one_process(
    lm_registry: tuple[Path, LocalRegistry], tmp_path: Path
) -> None:
    """Its scheduler batches every stream on every core: more processes would split the cores and copy the
    weights and cache (docs/benchmarks.md has the figures)."""
    server = start_server(lm_registry[1], tmp_path / "server.log", "lm", extra_args=("--workers", "auto"))
    try:
        reply = _client(server).completions.create(model="lm", prompt=PROMPT, max_tokens=3)
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 3
        log = server.log.read_text()
        assert "--workers auto: one process, since lm:1 is a language model" in log
        assert "serving with" not in log  # no supervisor: this process serves
    finally:
        assert stop_server(server) == 0


def test_bearer_tokens_and_scopes_apply_to_the_openai_routes(
    lm_registry: tuple[Path, LocalRegistry], tmp_path: Path
) -> None:
    registry = lm_registry[1]
    tokens = tmp_path / "tokens.yaml"
    allowed, other = add_token(tokens, "writer", ["infer:lm"]), add_token(tokens, "other", ["infer:mlp"])
    server = start_server(registry, tmp_path / "server.log", "lm", extra_args=("--tokens", str(tokens)))
    try:

        def client(key: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=f"{server.base()}/v1", api_key=key, max_retries=0)

        with client(allowed) as writer, client(other) as outsider, client("not-a-token") as stranger:
            reply = writer.chat.completions.create(model="lm", messages=[{"role": "user", "content": "sea"}],
                                                   max_tokens=3)  # fmt: skip
            assert reply.usage is not None
            assert reply.usage.completion_tokens == 3
            assert [m.id for m in outsider.models.list()] == []  # a token sees the models it may use
            assert [m.id for m in writer.models.list()] == ["lm"]
            # Scopes are checked before an alias is looked up: 403 either way, never 404-or-403.
            for model in ("lm@nothing", "lm@production", "lm:1"):
                with pytest.raises(openai.PermissionDeniedError):
                    outsider.completions.create(model=model, prompt=PROMPT, max_tokens=3)
            with pytest.raises(openai.NotFoundError):
                writer.completions.create(model="lm@nothing", prompt=PROMPT, max_tokens=3)
            assert writer.models.retrieve("lm:1").id == "lm:1"  # the scope names the model, not the version
            with pytest.raises(openai.PermissionDeniedError):
                outsider.models.retrieve("lm:1")
            with pytest.raises(openai.PermissionDeniedError, match="may not infer lm"):
                outsider.completions.create(model="lm", prompt=PROMPT, max_tokens=3)
            with pytest.raises(openai.AuthenticationError, match="unknown or revoked token"):
                stranger.completions.create(model="lm", prompt=PROMPT, max_tokens=3)
    finally:
        assert stop_server(server) == 0


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
# Arrays nested up to 700 deep (JSON parsers stop near 1,024): an error message must not recurse into them.
_deep = st.integers(1, 700).map(lambda depth: json.loads("[" * depth + "]" * depth))
_hostile = _json_values | _deep
_chat_bodies = st.fixed_dictionaries(
    {"model": st.just("lm")},
    optional={"messages": _hostile | st.lists(st.fixed_dictionaries(
                  {"role": st.sampled_from(["user", "x"]) | _hostile, "content": _hostile}), max_size=2),
              "prompt": _hostile | st.text(max_size=40), "max_tokens": _hostile, "temperature": _hostile,
              "top_p": _hostile, "seed": _hostile, "stop": _hostile | st.text(min_size=1, max_size=3000),
              "stream": _hostile, "stream_options": _hostile, "n": _hostile},
)  # fmt: skip


@settings(max_examples=120, deadline=None)
@given(body=_chat_bodies | _json_values, route=st.sampled_from(["chat/completions", "completions"]))
def test_random_openai_bodies_never_cause_a_5xx(lm_server: tuple[RunningServer, str], body: Any, route: str) -> None:
    server, _ = lm_server
    reply = httpx.post(f"{server.base()}/v1/{route}", json=body, timeout=30)
    assert reply.status_code in (200, 400, 404), (body, reply.text)
    if reply.status_code != 200:
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    elif '"error"' in reply.text:  # a stream that started must not end in an error event
        raise AssertionError((body, reply.text))


_generate_bodies = st.fixed_dictionaries(
    {},
    optional={"text_input": _hostile | st.text(max_size=80), "max_tokens": _hostile, "temperature": _hostile,
              "top_p": _hostile, "seed": _hostile, "stop": _hostile, "parameters": _hostile | st.fixed_dictionaries(
                  {}, optional={"max_tokens": _hostile, "stop": _hostile, "temperature": _hostile}),
              "id": _hostile},
)  # fmt: skip


@settings(max_examples=80, deadline=None)
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
