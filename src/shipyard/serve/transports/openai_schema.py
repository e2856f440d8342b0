"""OpenAI's request bodies as typed models: every field is honoured, refused with a 400 that names it, or one
of the few OpenAI itself treats as advisory (`user`, `metadata`, `store`, `service_tier`). Ranges are
OpenAI's; the sampling fields (and vLLM's extensions: top_k, min_p, repetition_penalty, stop_token_ids,
min_tokens, ignore_eos) are declared once, in sampling.Options, and shared with the V2 generate routes.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shipyard.errors import InvalidInputError
from shipyard.serve.core.sampling import Options, invalid

MAX_MESSAGES = 4096  # messages in one chat request

_NOT_SUPPORTED = "is not supported by this server"  # the end of a 400 for a combination this server does not do


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Generating(_Body):
    """What both completion routes take."""

    model: str = Field(min_length=1, max_length=512)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=128)
    max_tokens: int | None = Field(default=None, ge=1)  # checked here too: chat's max_completion_tokens wins
    # The sampling fields' ranges are sampling.Options' (one declaration for every route): `options` checks them.
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    guided_json: dict[str, Any] | None = None  # structured output, as vLLM names it
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    user: str | None = None  # advisory, as OpenAI treats it
    metadata: dict[str, str] | None = None  # advisory
    store: bool | None = None  # advisory: nothing is stored
    service_tier: str | None = None  # advisory

    @model_validator(mode="after")
    def _refused(self) -> _Generating:
        if self.stream_options is not None and not self.stream:
            raise _refuse("stream_options", "'stream_options' is only allowed when 'stream' is true")
        return self

    def options(
        self, max_tokens: int | None = None, schema: dict[str, Any] | None = None, logprobs: int | None = None
    ) -> Options:
        """The sampling options (InvalidInputError naming a field out of range); `schema`: a JSON schema the
        output must follow (from response_format); `logprobs`: how many alternatives each token's logprob
        comes with (None: no logprobs)."""
        fields = {name: getattr(self, name) for name in Options.model_fields
                  if name in type(self).model_fields and name != "logprobs"}  # fmt: skip
        fields["max_tokens"] = max_tokens if max_tokens is not None else self.max_tokens
        fields["logprobs"] = logprobs
        if schema is not None:
            if self.guided_json is not None:
                raise InvalidInputError("set response_format or guided_json, not both", param="guided_json")
            fields["guided_json"] = schema
        try:
            return Options.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            raise invalid(exc) from None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Generating):
    """POST /v1/completions."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=20)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None

    @model_validator(mode="after")
    def _combinations(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise _refuse("echo", f"'echo' with 'logprobs' (the prompt's own logprobs) {_NOT_SUPPORTED}")
        if self.best_of is not None and self.best_of < self.n:
            raise _refuse("best_of", "'best_of' must be at least 'n'")
        if self.best_of is not None and self.best_of > 1 and self.stream:
            raise _refuse("best_of", "'best_of' above 1 cannot be streamed: the best are known at the end")
        return self

    @property
    def candidates(self) -> int:
        """Completions to generate: best_of of them, the best n returned."""
        return max(self.n, self.best_of or 1)

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    def completion_options(self) -> Options:
        # best_of ranks candidates by their tokens' summed logprobs, so it needs them even unasked.
        return self.options(logprobs=self.logprobs if self.logprobs is not None or self.candidates == self.n else 0)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text


class ToolCallMessage(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    """One chat message; text content (a string, or text parts), and an assistant's earlier tool calls."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallMessage] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (transformers' apply_chat_template shape)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:  # templates read the arguments as a mapping (transformers' convention)
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                 for c in self.tool_calls]  # fmt: skip
        return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # calls that a grammar makes follow the schema either way


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the grammar holds the output to the schema either way


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise _refuse("response_format.json_schema", "response_format json_schema needs 'json_schema'")
        return self

    @property
    def output_schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must follow; None for plain text."""
        if self.type == "json_object":
            return {"type": "object"}
        return self.json_schema.schema_ if self.json_schema is not None else None


class ChatRequest(_Generating):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # advisory: a required call is one call

    @model_validator(mode="after")
    def _not_yet(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise _refuse("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        if self.tool_choice is not None and not self.tools:
            raise _refuse("tool_choice", "'tool_choice' is only allowed when 'tools' are given")
        return self

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)

    @property
    def offered_tools(self) -> list[dict[str, Any]]:
        """The tools the model is shown (none with tool_choice "none"), as transformers passes them."""
        if not self.tools or self.tool_choice == "none":
            return []
        return [t.model_dump(exclude_none=True) for t in self.tools]

    @property
    def required_tool(self) -> tuple[bool, str | None]:
        """(whether a call is required, the function it must be when one is named)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return True, self.tool_choice.function.name
        return bool(self.tools) and self.tool_choice == "required", None

    def chat_options(self, grammar: str | None = None) -> Options:
        """The options; `grammar`: Lark a required tool call must follow."""
        schema = self.response_format.output_schema if self.response_format is not None else None
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        options = self.options(self.max_completion_tokens or self.max_tokens, schema, logprobs)
        if grammar is None:
            return options
        if options.constraint is not None:
            raise InvalidInputError("a required tool call is a constraint of its own: drop response_format and "
                                    "guided_*, or use tool_choice auto", param="tool_choice")  # fmt: skip
        return options.model_copy(update={"guided_grammar": grammar})


class EmbeddingRequest(_Body):
    """POST /v1/embeddings."""

    model: str = Field(min_length=1, max_length=512)
    input: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                            Field(min_length=1, max_length=2048)]  # fmt: skip
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None  # advisory

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


Body = TypeVar("Body", bound=BaseModel)


class _RefusalError(ValueError):
    """Raised inside a validator: the field it names, and why (turned into the 400 by `parse`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param, self.message = param, message


def _refuse(param: str, message: str) -> _RefusalError:
    return _RefusalError(param, message)


def parse(model: type[Body], body: Any) -> Body:
    """A request body as `model`; InvalidInputError naming the field at fault."""
    if not isinstance(body, dict):
        raise InvalidInputError("the body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        cause = _cause(exc)
        if cause is not None:
            raise InvalidInputError(cause.message, param=cause.param) from None
        raise invalid(exc) from None


def _cause(exc: ValidationError) -> _RefusalError | None:
    for error in exc.errors(include_url=False):
        refusal = (error.get("ctx") or {}).get("error")
        if isinstance(refusal, _RefusalError):
            return refusal
    return None
