"""The clients LLM applications are built on, unchanged against the server: LangChain's ChatOpenAI
(`with_structured_output`, `bind_tools`) and litellm's `completion` with an `openai/` model. The model is a
random-initialised one with a Qwen-style tool template: grammars make its structured answers valid."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from tests._helpers import QWEN_STYLE
from tests.serve.conftest import RunningServer, byte_level_lm_server


class Ship(BaseModel):
    """A ship as the answer describes it."""

    name: Literal["ark", "brig", "cog"]
    speed: int = Field(ge=0, le=99)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with byte_level_lm_server(tmp_path_factory.mktemp("clients"), QWEN_STYLE) as running:
        yield running


def test_langchain_structured_output_and_tools(server: RunningServer) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model="lm", base_url=f"{server.base()}/v1", api_key="none", max_retries=0,
                      max_completion_tokens=96)  # fmt: skip
    ship = chat.with_structured_output(Ship).invoke("describe a ship")
    assert isinstance(ship, Ship)

    @tool
    def get_weather(port: Literal["north", "south"]) -> str:  # bounded: a random model's strings never end
        """The weather in a port."""
        return "calm"

    message = chat.bind_tools([get_weather], tool_choice="get_weather").invoke("weather at the port?")
    assert [call["name"] for call in message.tool_calls] == ["get_weather"]
    assert message.tool_calls[0]["args"]["port"] in ("north", "south")


def test_litellm_completion_with_an_openai_model(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # its price list from the package, not the web
    import litellm

    monkeypatch.setattr(litellm, "telemetry", False)
    reply = litellm.completion(model="openai/lm", api_base=f"{server.base()}/v1", api_key="none",
                               messages=[{"role": "user", "content": "north wind"}], max_tokens=5)  # fmt: skip
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 5
