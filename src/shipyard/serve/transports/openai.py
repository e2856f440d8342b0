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
from typing import TYPE_CHECKING, Any

import numpy as np

from shipyard.errors import ErrorKind, InvalidInputError, NotFoundError, ShipyardError
from shipyard.registry.refs import parse_ref
from shipyard.serve.core import tools
from shipyard.serve.core.decoder import Generation
from shipyard.serve.core.repository import ModelHandle
from shipyard.serve.protocol.types import InferRequest, Tensor
from shipyard.serve.transports import rest_codec as codec
from shipyard.serve.transports.edge import HTTP_STATUS, public_error
from shipyard.serve.transports.openai_answer import Answer
from shipyard.serve.transports.openai_schema import ChatRequest, CompletionRequest, EmbeddingRequest, parse

if TYPE_CHECKING:
    from shipyard.serve.transports.rest import Call, RestApp

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


def _created(handle: ModelHandle) -> int:
    """When the version was built, as OpenAI's `created` (seconds since the epoch)."""
    return int(datetime.datetime.fromisoformat(handle.manifest.created_at).timestamp())


def _model_card(ident: str, created: int) -> dict[str, Any]:
    return {"id": ident, "object": "model", "created": created, "owned_by": "shipyard"}


def _shortened(vectors: np.ndarray, size: int, source: dict[str, Any]) -> np.ndarray:
    """Embeddings cut to `size` and L2-normalised again, for a model the spec declares those sizes for."""
    allowed = source.get("dimensions") or []
    if size not in allowed:
        sizes = f"the sizes it was trained for: {', '.join(map(str, allowed))}" if allowed else "one size"
        raise InvalidInputError(f"'dimensions' {size} is not one of this model's embedding sizes ({sizes})",
                                param="dimensions")  # fmt: skip
    cut = vectors[:, :size]
    return cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)  # type: ignore[no-any-return]


class OpenAIRoutes:
    """The handlers; each takes the REST app (for the services and body reading) and the matched call."""

    @staticmethod
    async def models(app: RestApp, call: Call) -> Any:
        """One entry per model a client should name (`NAME`: the version the rollout rules pick), created when
        its newest loaded version was built; pinned ids (NAME:VERSION, NAME@ALIAS) work without being listed."""
        newest: dict[str, ModelHandle] = {}
        for handle in app.services.management.repository.handles():
            if app.may_infer(call, handle.name) and handle.version >= getattr(newest.get(handle.name), "version", 0):
                newest[handle.name] = handle  # a token sees the models it may use
        cards = [_model_card(name, _created(newest[name])) for name in sorted(newest)]
        return app.json({"object": "list", "data": cards})

    @staticmethod
    async def model(app: RestApp, call: Call) -> Any:
        name, version = _model_ref(app, call, call.name)
        handle = app.services.management.repository.get(name, version)  # NotFoundError when it is not loaded
        return app.json(_model_card(str(call.name), _created(handle)))

    @staticmethod
    async def _start(app: RestApp, call: Call, chat: bool) -> tuple[ChatRequest | CompletionRequest, Generation]:
        body = codec.decode_object(await app.body(call))
        request = parse(ChatRequest if chat else CompletionRequest, body)
        name, version = _model_ref(app, call, request.model)
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
    async def completions(app: RestApp, call: Call) -> Any:
        return await OpenAIRoutes._answer(app, call, chat=False)

    @staticmethod
    async def chat_completions(app: RestApp, call: Call) -> Any:
        return await OpenAIRoutes._answer(app, call, chat=True)

    @staticmethod
    async def _answer(app: RestApp, call: Call, chat: bool) -> Any:
        request, first = await OpenAIRoutes._start(app, call, chat)
        answer = Answer(request, first, app.services.generation)
        if not request.stream:
            return app.json(await answer.whole())
        return app.events(answer.events(), openai=True, on_close=answer.cancel)

    @staticmethod
    async def embeddings(app: RestApp, call: Call) -> Any:
        body = parse(EmbeddingRequest, codec.decode_object(await app.body(call)))
        name, version = _model_ref(app, call, body.model)
        texts, encoding = body.texts, body.encoding_format
        version = app.dataplane.draw(name, version)  # the schema read is the answering version's
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
        if body.dimensions is not None:
            handle = app.services.management.repository.get(name, response.model_version)
            vectors = _shortened(vectors, body.dimensions, (handle.manifest.spec or {}).get("model", {}))
        items = [{"object": "embedding", "index": i,
                  "embedding": base64.b64encode(v.tobytes()).decode() if encoding == "base64" else v.tolist()}
                 for i, v in enumerate(vectors)]  # fmt: skip
        encoder = app.services.management.repository.get(name, response.model_version).runtime.text_encoder
        tokens = encoder.count(texts) if encoder is not None else 0
        return app.json({"object": "list", "data": items, "model": body.model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip
