"""The OpenAI API on the REST port: models, completions, chat completions (streamed or not) and embeddings.

A thin adapter like the V2 one: it decodes OpenAI's request shapes, calls the same generation and data
plane, and encodes OpenAI's answers, so the official `openai` package works unchanged. Model ids are the
registry's names (`NAME`, `NAME:VERSION`, `NAME@ALIAS`). Errors leave in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, and a full queue answers 429 (clients back off and retry).
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

import numpy as np

from shipyard.errors import ErrorKind, InvalidInputError, NotFoundError, ShipyardError, brief
from shipyard.registry.refs import parse_ref
from shipyard.serve.core.decoder import ROLES, Generation, options_of
from shipyard.serve.protocol.types import InferRequest, Tensor
from shipyard.serve.transports import rest_codec as codec
from shipyard.serve.transports.edge import HTTP_STATUS, public_error

if TYPE_CHECKING:
    from shipyard.serve.transports.rest import Call, RestApp

PREFIX = "/v1/"
STATUS = {**HTTP_STATUS, ErrorKind.OVERLOADED: 429}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 408: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error"}  # fmt: skip
MAX_MESSAGES = 4096  # messages in one chat request
_UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "functions", "response_format", "logit_bias", "suffix")


def error_body(exc: BaseException, where: str) -> tuple[int, dict[str, Any]]:
    """An error as OpenAI's status and body."""
    kind, message = public_error(exc, where)
    status = STATUS[kind]
    param = exc.param if isinstance(exc, ShipyardError) and kind is not ErrorKind.INTERNAL else None
    code = exc.code if isinstance(exc, ShipyardError) and kind is not ErrorKind.INTERNAL else None
    if code is None and kind is ErrorKind.NOT_FOUND:
        code = "model_not_found"
    return status, {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                              "code": code}}  # fmt: skip


def _model_ref(app: RestApp, call: Call, model: Any) -> tuple[str, str | None]:
    """`NAME`, `NAME:VERSION` or `NAME@ALIAS` as (name, version or None), once the caller's token may use
    NAME: the scope is checked before an alias is looked up, so a 404 never tells an outsider which exist."""
    if not isinstance(model, str) or not model:
        raise InvalidInputError("'model' must be a model id (see GET /v1/models)", param="model")
    app.check_model(call, model.partition("@")[0].partition(":")[0])
    if "@" in model:
        try:
            record = app.services.management.repository.registry.resolve(parse_ref(model))
        except ShipyardError as exc:
            raise NotFoundError(f"model {model!r}: {exc}", param="model") from None
        return record.name, str(record.version)
    name, _, version = model.partition(":")
    return name, version or None


def _int_field(body: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"'{name}' must be a whole number of at least 1, got {brief(value)}",
                                        param=name)  # fmt: skip
            return value
    return None


def _common(body: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields both completion routes take, as the decoder's option names; refuses what is not
    supported rather than silently ignoring it."""
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidInputError("only n = 1 is supported: send one request per completion", param="n")
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}) and not (name == "response_format" and
                                                                 body[name] == {"type": "text"}):  # fmt: skip
            raise InvalidInputError(f"'{name}' is not supported by this server", param=name)
    max_tokens = _int_field(body, "max_completion_tokens", "max_tokens")
    parameters = {k: body.get(k) for k in ("temperature", "top_p", "seed", "stop")}
    return {**parameters, "max_tokens": max_tokens}


def _messages(value: Any) -> list[dict[str, str]]:
    """Chat messages with text content (a string, or a list of {"type": "text", "text": ...} parts)."""
    if not isinstance(value, list) or not value:
        raise InvalidInputError("'messages' must be a non-empty list of {role, content}", param="messages")
    if len(value) > MAX_MESSAGES:
        raise InvalidInputError(f"'messages' has {len(value)} messages; the limit is {MAX_MESSAGES}", param="messages")
    out = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidInputError(f"{where}: 'role' must be one of {', '.join(sorted(ROLES))}", param=where)
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):  # fmt: skip
                raise InvalidInputError(f"{where}: only text content parts are supported", param=where)
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InvalidInputError(f"{where}: 'content' must be text", param=where)
        out.append({"role": message["role"], "content": content})
    return out


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidInputError("'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidInputError("'stream_options' must be an object", param="stream_options")
    return stream, bool(options.get("include_usage", False))


def _model_card(ident: str) -> dict[str, Any]:
    return {"id": ident, "object": "model", "created": int(time.time()), "owned_by": "shipyard"}


def _usage(generation: Generation) -> dict[str, int]:
    u = generation.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}  # fmt: skip


class OpenAIRoutes:
    """The handlers; each takes the REST app (for the services and body reading) and the matched call."""

    @staticmethod
    async def models(app: RestApp, call: Call) -> Any:
        """Every loaded model by name (the version the rollout rules pick), then every version by NAME:VERSION."""
        handles = sorted(app.services.management.repository.handles(), key=lambda h: (h.name, h.version))
        handles = [h for h in handles if app.may_infer(call, h.name)]  # a token sees the models it may use
        ids = [*sorted({h.name for h in handles}), *(f"{h.name}:{h.version}" for h in handles)]
        return app.json({"object": "list", "data": [_model_card(i) for i in ids]})

    @staticmethod
    async def model(app: RestApp, call: Call) -> Any:
        name, version = _model_ref(app, call, call.name)
        app.services.management.repository.get(name, version)  # NotFoundError when it is not loaded
        return app.json(_model_card(str(call.name)))

    @staticmethod
    async def _start(app: RestApp, call: Call, chat: bool) -> tuple[dict[str, Any], Generation]:
        body = codec.decode_object(await app.body(call))
        name, version = _model_ref(app, call, body.get("model"))
        decoder = app.services.generation.decoder(name, version)
        options = options_of(_common(body))
        # Rendering and tokenizing cost what the input makes them cost: off the event loop.
        if chat:
            messages = _messages(body.get("messages"))
            return body, await asyncio.to_thread(
                lambda: decoder.start(decoder.render_chat(messages), options, templated=True)
            )
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InvalidInputError("'prompt' must be one string", param="prompt")
        return body, await asyncio.to_thread(decoder.start, prompt, options)

    @staticmethod
    async def completions(app: RestApp, call: Call) -> Any:
        return await OpenAIRoutes._answer(app, call, chat=False)

    @staticmethod
    async def chat_completions(app: RestApp, call: Call) -> Any:
        return await OpenAIRoutes._answer(app, call, chat=True)

    @staticmethod
    async def _answer(app: RestApp, call: Call, chat: bool) -> Any:
        body, generation = await OpenAIRoutes._start(app, call, chat)
        stream, include_usage = _stream_options(body)
        model = body["model"]
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        generating = app.services.generation

        def choice(text: str | None, finish: str | None, delta: bool) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            key = "delta" if delta else "message"
            content: dict[str, Any] = {"content": text} if text is not None else {}
            if not delta:
                content = {"role": "assistant", "content": text or ""}
            return {"index": 0, key: content, "logprobs": None, "finish_reason": finish}

        if not stream:
            text = await generating.text(generation)
            return app.json({"id": ident, "object": kind, "created": created, "model": model,
                             "choices": [choice(text, generation.finish_reason, delta=False)],
                             "usage": _usage(generation)})  # fmt: skip
        chunk = {"id": ident, "object": f"{kind}.chunk" if chat else kind, "created": created, "model": model}
        generating.admit(generation)  # a full queue answers 429 before the stream starts

        async def events() -> AsyncGenerator[dict[str, Any], None]:
            if chat:  # the first chunk names the role, as OpenAI's does
                yield {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]}  # fmt: skip
            async for piece in generating.stream(generation):
                yield {**chunk, "choices": [choice(piece, None, delta=True)]}
            yield {**chunk, "choices": [choice(None if chat else "", generation.finish_reason, delta=True)]}
            if include_usage:
                yield {**chunk, "choices": [], "usage": _usage(generation)}

        return app.events(events(), openai=True, on_close=generation.cancel)

    @staticmethod
    async def embeddings(app: RestApp, call: Call) -> Any:
        body = codec.decode_object(await app.body(call))
        name, version = _model_ref(app, call, body.get("model"))
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise InvalidInputError("'input' must be a non-empty string or a list of them (token ids are not "
                                    "supported)", param="input")  # fmt: skip
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise InvalidInputError("'encoding_format' must be float or base64", param="encoding_format")
        if app.services.generation.generates(name, version):
            raise InvalidInputError(f"model {name!r} is a language model: use /v1/completions", param="model")
        schema = app.dataplane.model_metadata(name, version)
        if len(schema.inputs) != 1 or schema.inputs[0].datatype != "BYTES" or not schema.outputs:
            raise InvalidInputError(f"model {name!r} does not take one text input: it is not an embedding model",
                                    param="model")  # fmt: skip
        tensor = schema.inputs[0]
        shape = [len(texts), *([1] * (len(tensor.shape) - 1))]
        data = np.array([t.encode() for t in texts], dtype=object).reshape(shape)
        request = InferRequest([Tensor(tensor.name, "BYTES", shape, data)])
        response = await app.dataplane.infer(name, version, request)
        vectors = np.asarray(response.outputs[0].data, dtype=np.float32).reshape(len(texts), -1)
        items = [{"object": "embedding", "index": i,
                  "embedding": base64.b64encode(v.tobytes()).decode() if encoding == "base64" else v.tolist()}
                 for i, v in enumerate(vectors)]  # fmt: skip
        encoder = app.services.management.repository.get(name, response.model_version).runtime.text_encoder
        tokens = encoder.count(texts) if encoder is not None else 0
        return app.json({"object": "list", "data": items, "model": body["model"],
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip
