"""Tool calls: the chat template shows the model its tools (the `tools` variable, as transformers'
apply_chat_template passes it), and the answer is read back into OpenAI's `tool_calls`.

Models write calls in one of three common formats, told apart by their chat template:
- hermes (Qwen 2.5 and 3, Hermes, many others): `<tool_call>{"name": …, "arguments": {…}}</tool_call>`;
- llama3 (Llama 3.1 to 3.3): a bare JSON object `{"name": …, "parameters": {…}}`;
- mistral: `[TOOL_CALLS] [{"name": …, "arguments": {…}}]`.
When a call is required (`tool_choice: "required"`, or a named function) a grammar makes the answer one
call in that format, its arguments following the function's JSON schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from shipyard.errors import InvalidInputError

Format = Literal["hermes", "llama3", "mistral"]
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def detect(template: str | None) -> Format | None:
    """The format a chat template writes tool calls in; None when it shows no tools."""
    if not template or "tools" not in template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ('"parameters"' in template and "<|eot_id|>" in template):
        return "llama3"
    return None


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def openai(self) -> dict[str, Any]:
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}  # fmt: skip


def _call(item: Any, arguments_key: str, names: set[str]) -> ToolCall | None:
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    arguments = item.get(arguments_key, item.get("arguments", {}))
    return ToolCall(str(item["name"]), json.dumps(arguments, ensure_ascii=False))


def parse(fmt: Format, text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of an answer: calls of the offered tools in `fmt`; text that holds none stays content."""
    try:
        if fmt == "hermes":
            calls = [_call(json.loads(body), "arguments", names) for body in _HERMES.findall(text)]
            found = [c for c in calls if c is not None]
            rest = _HERMES.sub("", text).strip()
            return (rest or None, found) if found else (text, [])
        if fmt == "mistral":
            head, marker, body = text.partition("[TOOL_CALLS]")
            items = json.loads(body) if marker else []
            found = [c for c in (_call(i, "arguments", names) for i in items) if c is not None]
            return (head.strip() or None, found) if found else (text, [])
        stripped = text.strip().removeprefix("<|python_tag|>")
        if stripped.startswith("{"):
            call = _call(json.loads(stripped), "parameters", names)
            if call is not None:
                return None, [call]
    except (ValueError, TypeError):  # not a call after all: the text is the answer
        pass
    return text, []


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool.get("function")
    return function if isinstance(function, dict) else {}


def _closed(schema: Any) -> Any:
    """The schema with objects that list their properties closed to others unless it says so (as OpenAI's
    strict mode has them): a call carries the function's arguments, and a model cannot wander into more."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if "properties" in closed and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


def grammar(fmt: Format, tools: list[dict[str, Any]], only: str | None) -> str:
    """A Lark grammar (llguidance's, with %json) for exactly one call: of `only`, else of any tool."""
    key = "parameters" if fmt == "llama3" else "arguments"
    chosen = [t for t in tools if only is None or _function(t).get("name") == only]
    if not chosen:
        raise InvalidInputError(f"tool_choice names {only!r}, which is not among the tools", param="tool_choice")
    options = [{"type": "object", "additionalProperties": False, "required": ["name", key],
                "properties": {"name": {"const": _function(t).get("name")},
                               key: _closed(_function(t).get("parameters") or {"type": "object"})}}
               for t in chosen]  # fmt: skip
    schema = json.dumps({**(options[0] if len(options) == 1 else {"anyOf": options}), "x-guidance": _COMPACT})
    if fmt == "hermes":
        return f'start: "<tool_call>\\n" %json {schema} "\\n</tool_call>"'
    if fmt == "mistral":
        return f'start: "[TOOL_CALLS] [" %json {schema} "]"'
    return f"start: %json {schema}"
