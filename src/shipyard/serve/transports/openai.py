"""The OpenAI API on the REST port: models, completions, chat completions (streamed or not) and embeddings.

A thin adapter like the V2 one: it decodes OpenAI's request shapes, calls the same generation and data
plane, and encodes OpenAI's answers, so the official `openai` package works unchanged. Model ids are the
registry's names (`NAME`, `NAME:VERSION`, `NAME@ALIAS`). Errors leave in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, and a full queue answers 429 (clients back off and retry).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
from typing import Any

from shipyard.errors import ErrorKind, InvalidInputError, ShipyardError
from shipyard.serve.core import tools
from shipyard.serve.core.decoder import Generation
from shipyard.serve.protocol.types import ModelCard
from shipyard.serve.transports import openai_answer
from shipyard.serve.transports import rest_codec as codec
from shipyard.serve.transports.edge import HTTP_STATUS, public_error
from shipyard.serve.transports.http import Answer, Api, Call, EventStream, HttpApp, Route, json_answer
from shipyard.serve.transports.openai_schema import ChatRequest, CompletionRequest, EmbeddingRequest, parse

PREFIX = "/v1/"
STATUS = {**HTTP_STATUS, ErrorKind.OVERLOADED: 429}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 408: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error"}  # fmt: skip


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


async def _model_ref(app: HttpApp, call: Call, model: Any) -> tuple[str, str | None]:
    """`NAME`, `NAME:VERSION` or `NAME@ALIAS` as (name, version or None), once the caller's token may use
    NAME: the scope is checked before an alias is looked up, so a 404 never tells an outsider which exist."""
    if not isinstance(model, str) or not model:
        raise InvalidInputError("'model' must be a model id (see GET /v1/models)", param="model")
    app.check_model(call, model.partition("@")[0].partition(":")[0])
    return await app.dataplane.resolve(model)


def _model_card(ident: str, card: ModelCard) -> dict[str, Any]:
    """A model as OpenAI lists it; `created` is when the version was built (seconds since the epoch)."""
    created = int(datetime.datetime.fromisoformat(card.created_at).timestamp())
    return {"id": ident, "object": "model", "created": created, "owned_by": "shipyard"}


class OpenAIRoutes:
    """The handlers; each takes the REST app (for the services and body reading) and the matched call."""

    @staticmethod
    async def models(app: HttpApp, call: Call) -> Answer:
        """One entry per model a client should name (`NAME`: the version the rollout rules pick), created when
        its newest loaded version was built; pinned ids (NAME:VERSION, NAME@ALIAS) work without being listed."""
        cards = [_model_card(card.name, card) for card in app.dataplane.cards() if app.may_infer(call, card.name)]
        return json_answer({"object": "list", "data": cards})  # a token sees the models it may use

    @staticmethod
    async def model(app: HttpApp, call: Call) -> Answer:
        name, version = await _model_ref(app, call, call.name)
        return json_answer(_model_card(str(call.name), app.dataplane.card(name, version)))

    @staticmethod
    async def _start(app: HttpApp, call: Call, chat: bool) -> tuple[ChatRequest | CompletionRequest, Generation]:
        body = codec.decode_object(await app.body(call))
        request = parse(ChatRequest if chat else CompletionRequest, body)
        name, version = await _model_ref(app, call, request.model)
        decoder = app.services.generation.decoder(name, version)
        # Rendering and tokenizing cost what the input makes them cost: off the event loop.
        if isinstance(request, ChatRequest):
            offered, grammar = request.offered_tools, None
            if offered:
                if decoder.tool_format is None:
                    raise InvalidInputError(f"{name}'s chat template shows the model no tools, or writes calls in a "
                                            "format this server does not read", param="tools")  # fmt: skip
                required, only = request.required_tool
                if required:  # a grammar makes the answer one call
                    grammar = tools.grammar(decoder.tool_format, offered, only)
            messages, options = [m.for_template() for m in request.messages], request.chat_options(grammar)
            return request, await asyncio.to_thread(
                lambda: decoder.start(decoder.render_chat(messages, offered), options, templated=True)
            )
        assert isinstance(request, CompletionRequest)
        prompt = decoder.infill(request.text, request.suffix) if request.suffix else request.text
        return request, await asyncio.to_thread(decoder.start, prompt, request.completion_options())

    @staticmethod
    async def completions(app: HttpApp, call: Call) -> Answer:
        return await OpenAIRoutes._answer(app, call, chat=False)

    @staticmethod
    async def chat_completions(app: HttpApp, call: Call) -> Answer:
        return await OpenAIRoutes._answer(app, call, chat=True)

    @staticmethod
    async def _answer(app: HttpApp, call: Call, chat: bool) -> Answer:
        request, first = await OpenAIRoutes._start(app, call, chat)
        answer = openai_answer.Answer(request, first, app.services.generation)
        if not request.stream:
            return json_answer(await answer.whole())
        return EventStream(answer.events(), on_close=answer.cancel)

    @staticmethod
    async def embeddings(app: HttpApp, call: Call) -> Answer:
        body = parse(EmbeddingRequest, codec.decode_object(await app.body(call)))
        name, version = await _model_ref(app, call, body.model)
        embedded = await app.dataplane.embed(name, version, body.texts, body.dimensions)
        base64_vectors = body.encoding_format == "base64"
        items = [{"object": "embedding", "index": i,
                  "embedding": base64.b64encode(v.tobytes()).decode() if base64_vectors else v.tolist()}
                 for i, v in enumerate(embedded.vectors)]  # fmt: skip
        tokens = embedded.tokens
        return json_answer({"object": "list", "data": items, "model": body.model,
                            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip


OPENAI = Api(
    PREFIX,
    [  # the model is named in the body, and checked there (HttpApp.check_model)
        Route("GET", "/v1/models", "read", OpenAIRoutes.models),
        Route("GET", "/v1/models/{name}", "read", OpenAIRoutes.model),
        Route("POST", "/v1/completions", "infer", OpenAIRoutes.completions),
        Route("POST", "/v1/chat/completions", "infer", OpenAIRoutes.chat_completions),
        Route("POST", "/v1/embeddings", "infer", OpenAIRoutes.embeddings),
    ],
    error_body,
    stream_end=b"[DONE]",
)
