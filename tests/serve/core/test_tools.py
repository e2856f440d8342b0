"""Tool calls on a real server with the official client: tools shown through the chat template, calls read
back into OpenAI's tool_calls (and streamed as deltas), a required or named call made valid by a grammar,
and the round trip (assistant tool_calls, then a tool message, then the answer) — for a Qwen-style template
(<tool_call> tags) and a Llama-3-style one (a bare JSON object with "parameters")."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests._helpers import LLAMA3_STYLE, QWEN_STYLE
from tests.serve.conftest import RunningServer, byte_level_lm_server

TOOLS: Any = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a port.",
                                      "parameters": {"type": "object", "additionalProperties": False,
                                                     "properties": {"port": {"type": "string", "maxLength": 8},
                                                                    "days": {"type": "integer", "minimum": 1,
                                                                             "maximum": 7}},
                                                     "required": ["port", "days"]}}},
    {"type": "function", "function": {"name": "set_sail", "parameters": {
        "type": "object", "properties": {"north": {"type": "boolean"}}, "required": ["north"],
        "additionalProperties": False}}},
]  # fmt: skip
QUESTION: Any = [{"role": "user", "content": "weather at the port?"}]


@pytest.fixture(scope="module", params=["qwen", "llama3"])
def tool_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    template = QWEN_STYLE if request.param == "qwen" else LLAMA3_STYLE
    with byte_level_lm_server(tmp_path_factory.mktemp(f"tools-{request.param}"), template) as running:
        yield running


@pytest.fixture
def client(tool_server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{tool_server.base()}/v1", api_key="none", max_retries=0) as made:
        yield made


def test_a_required_call_is_a_valid_call_and_the_round_trip_answers(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="lm", messages=QUESTION, tools=TOOLS, tool_choice="required",
                                           max_tokens=96)  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert call.function.name in ("get_weather", "set_sail")
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert set(arguments) == {"port", "days"}
        assert 1 <= arguments["days"] <= 7
    else:
        assert isinstance(arguments["north"], bool)
    # The round trip: the assistant's call and the tool's result go back through the template.
    history: Any = [*QUESTION, choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "calm, 12 knots"}]  # fmt: skip
    answer = client.chat.completions.create(model="lm", messages=history, tools=TOOLS, tool_choice="none",
                                            max_tokens=8)  # fmt: skip
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert isinstance(answer.choices[0].message.content, str)
    assert answer.usage is not None
    shorter = client.chat.completions.create(model="lm", messages=QUESTION, tool_choice="none", tools=TOOLS,
                                             max_tokens=8)  # fmt: skip
    assert shorter.usage is not None
    assert answer.usage.prompt_tokens > shorter.usage.prompt_tokens  # the call and its result were rendered


def test_a_named_function_is_called_and_streamed_as_a_tool_call_delta(client: openai.OpenAI) -> None:
    named: Any = {"type": "function", "function": {"name": "set_sail"}}
    stream = client.chat.completions.create(model="lm", messages=QUESTION, tools=TOOLS, tool_choice=named,
                                            max_tokens=96, stream=True)  # fmt: skip
    names, arguments, finishes = [], "", []
    for chunk in stream:
        for c in chunk.choices:
            for delta in c.delta.tool_calls or []:
                names.append(delta.function.name if delta.function else None)
                arguments += (delta.function.arguments or "") if delta.function else ""
            if c.finish_reason:
                finishes.append(c.finish_reason)
    assert names == ["set_sail"]
    assert isinstance(json.loads(arguments)["north"], bool)
    assert finishes == ["tool_calls"]


def test_a_named_function_that_is_not_offered_is_a_400(tool_server: RunningServer) -> None:
    body = {"model": "lm", "messages": QUESTION, "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "scuttle"}}}  # fmt: skip
    reply = httpx.post(f"{tool_server.base()}/v1/chat/completions", json=body)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "tool_choice"
