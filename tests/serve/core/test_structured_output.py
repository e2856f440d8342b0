"""Structured output on a real server: OpenAI's response_format (json_schema, json_object) and vLLM's guided_*
extensions, enforced by a grammar on a random-initialised model — the grammar, not the weights, makes the
answer valid. The model's tokenizer is a byte-level BPE, as real ones are, so it can write JSON; it has
fill-in-the-middle tokens too, which `suffix` uses."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.serve.conftest import RunningServer, byte_level_lm_server


class Ship(BaseModel):
    name: Literal["ark", "brig", "cog"]
    speed: int = Field(ge=0, le=99)
    sails: bool
    port: str = Field(max_length=6)


@pytest.fixture(scope="module")
def json_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with byte_level_lm_server(tmp_path_factory.mktemp("structured")) as running:
        yield running


@pytest.fixture(scope="module")
def client(json_server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{json_server.base()}/v1", api_key="none", max_retries=0) as made:
        yield made


MESSAGES: Any = [{"role": "user", "content": "north wind"}]


def test_parse_returns_the_pydantic_object_under_a_strict_json_schema(client: openai.OpenAI) -> None:
    """The official client's parse(): it sends the model's JSON schema (strict) and parses the answer."""
    for temperature in (0.0, 1.0):
        completion = client.chat.completions.parse(model="lm", messages=MESSAGES, response_format=Ship,
                                                   max_tokens=96, temperature=temperature, seed=3)  # fmt: skip
        ship = completion.choices[0].message.parsed
        assert isinstance(ship, Ship)
        assert completion.choices[0].finish_reason == "stop"
        assert json.loads(completion.choices[0].message.content or "") == ship.model_dump()


def test_guided_choice_and_regex_are_kept_to(client: openai.OpenAI) -> None:
    for seed in range(3):
        choices = ["north wind", "south sea", "calm"]
        reply = client.completions.create(model="lm", prompt="north", max_tokens=20, temperature=1.0, seed=seed,
                                          extra_body={"guided_choice": choices})  # fmt: skip
        assert reply.choices[0].text in ("north wind", "south sea", "calm")
        pattern = r"(ark|brig) [0-9]{2}"
        reply = client.completions.create(model="lm", prompt="north", max_tokens=20, temperature=1.0, seed=seed,
                                          extra_body={"guided_regex": pattern})  # fmt: skip
        assert re.fullmatch(pattern, reply.choices[0].text), reply.choices[0].text


def test_json_object_starts_an_object_and_streams_the_same_text(client: openai.OpenAI) -> None:
    fields: Any = {"model": "lm", "messages": MESSAGES, "max_tokens": 40, "response_format": {"type": "json_object"}}
    whole = client.chat.completions.create(**fields).choices[0].message.content or ""
    assert whole.startswith("{")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**fields, stream=True)
                       if c.choices)  # fmt: skip
    assert streamed == whole


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"guided_regex": "("}, "guided_regex"), ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
     ({"guided_regex": "a", "guided_choice": ["b"]}, None), ({"guided_json": {"type": "nonsense"}}, "guided_json")],
)  # fmt: skip
def test_a_grammar_that_is_not_one_is_a_400(
    json_server: RunningServer, extra: dict[str, Any], param: str | None
) -> None:
    reply = httpx.post(f"{json_server.base()}/v1/completions",
                       json={"model": "lm", "prompt": "north", "max_tokens": 4, **extra})  # fmt: skip
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_constrained_and_free_sequences_share_a_batch_without_changing_each_other(
    json_server: RunningServer, client: openai.OpenAI
) -> None:
    free = [client.completions.create(model="lm", prompt=p, max_tokens=16).choices[0].text
            for p in ("north", "south sea", "calm")]  # fmt: skip

    async def together() -> tuple[list[str], list[str]]:
        async with openai.AsyncOpenAI(base_url=f"{json_server.base()}/v1", api_key="none", max_retries=0) as c:
            plain = [c.completions.create(model="lm", prompt=p, max_tokens=16) for p in ("north", "south sea", "calm")]
            ships = [c.chat.completions.parse(model="lm", messages=MESSAGES, response_format=Ship, max_tokens=96,
                                              temperature=1.0, seed=s) for s in range(3)]  # fmt: skip
            done = await asyncio.gather(*plain, *ships)
        return [r.choices[0].text for r in done[:3]], [r.choices[0].message.content for r in done[3:]]

    texts, answers = asyncio.run(together())
    assert texts == free
    assert all(Ship.model_validate_json(a or "") for a in answers)


def test_suffix_asks_for_the_middle_with_the_models_fill_in_the_middle_tokens(
    json_server: RunningServer, client: openai.OpenAI
) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(json_server.registry.root.parent / "hf" / "tokenizer.json"))
    infill = "<fim_prefix>def sail(<fim_suffix>):\n    return wind<fim_middle>"
    reply = client.completions.create(model="lm", prompt="def sail(", suffix="):\n    return wind", max_tokens=4)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(tokenizer.encode(infill).ids)
    assert reply.choices[0].text == client.completions.create(model="lm", prompt=infill, max_tokens=4).choices[0].text
