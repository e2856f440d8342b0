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
import itertools
import time
import uuid
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

import numpy as np

from shipyard.errors import ErrorKind, InvalidInputError, NotFoundError, ShipyardError
from shipyard.registry.refs import parse_ref
from shipyard.serve.core import tools
from shipyard.serve.core.decoder import Decoder, Generation
from shipyard.serve.core.repository import ModelHandle
from shipyard.serve.core.sampling import TokenLogprob
from shipyard.serve.protocol.types import InferRequest, Tensor
from shipyard.serve.transports import rest_codec as codec
from shipyard.serve.transports.edge import HTTP_STATUS, public_error
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


def _logprobs(decoder: Decoder, entries: list[TokenLogprob], chat: bool) -> dict[str, Any]:
    """Tokens' logprobs in OpenAI's shapes: chat's `content` list, or the completions API's parallel lists."""

    def text(token: int) -> str:
        return str(decoder.tokenizer.decode([token], skip_special_tokens=False))

    if chat:

        def item(token: int, logprob: float) -> dict[str, Any]:
            piece = text(token)
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}  # fmt: skip
    tokens = [text(e.token) for e in entries]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=0)) if tokens else []
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}  # fmt: skip


def _best(generations: list[Generation], n: int) -> list[int]:
    """The n generations to answer with: all of them in order, or (best_of) the n whose tokens have the
    highest summed logprob, best first."""
    if len(generations) == n:
        return list(range(n))
    scores = [sum(e.logprob for e in g.logprobs()) for g in generations]
    return sorted(range(len(generations)), key=lambda i: -scores[i])[:n]


def _usage(generations: list[Generation]) -> dict[str, int]:
    """One prompt (it was prefilled once), every choice's completion."""
    prompt = generations[0].usage.prompt_tokens
    completion = sum(g.usage.completion_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _interleaved(streams: list[AsyncGenerator[str, None]]) -> AsyncGenerator[tuple[int, str | None], None]:
    """(index, piece) from every stream as they come, then (index, None) when that one ends; the first error
    ends them all."""
    if len(streams) == 1:  # the common case needs no tasks
        async for only in streams[0]:
            yield 0, only
        yield 0, None
        return
    arrived: asyncio.Queue[tuple[int, str | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[str, None]) -> None:
        try:
            async for piece in stream:
                await arrived.put((index, piece, None))
            await arrived.put((index, None, None))
        except Exception as exc:  # handed to the consumer, which raises it
            await arrived.put((index, None, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        ended = 0
        while ended < len(streams):
            index, piece, error = await arrived.get()
            if error is not None:
                raise error
            ended += piece is None
            yield index, piece
    finally:
        for task in tasks:
            task.cancel()


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
        completion = request if isinstance(request, CompletionRequest) else None
        generations = first.choices(completion.candidates if completion else request.n)
        echo = completion.text if completion is not None and completion.echo else ""
        stream, include_usage, model = request.stream, request.include_usage, request.model
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        generating = app.services.generation

        sent = [0] * len(generations)  # tokens whose logprobs went out, per choice

        def choice(
            index: int,
            text: str | None,
            finish: str | None,
            delta: bool,
            calls: list[tools.ToolCall] | None = None,
            source: int | None = None,
        ) -> dict[str, Any]:
            """Choice `index` of the answer, from generation `source` (the same unless best_of reordered)."""
            logprobs, source = None, index if source is None else source
            if request.wants_logprobs:
                entries = generations[source].logprobs(sent[source])
                logprobs = _logprobs(generations[source].decoder, entries, chat)
                sent[source] += len(entries)
            if not chat:
                return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            key = "delta" if delta else "message"
            content: dict[str, Any] = {"content": text} if text is not None else {}
            if not delta:
                content = {"role": "assistant", "content": text if calls else text or ""}
            if calls:  # streamed as one delta each, with its index, as OpenAI's clients read them
                content["tool_calls"] = [
                    {"index": i, **c.openai()} if delta else c.openai() for i, c in enumerate(calls)
                ]
            return {"index": index, key: content, "logprobs": logprobs, "finish_reason": finish}

        fmt, names = None, set()
        if isinstance(request, ChatRequest) and request.offered_tools:
            fmt, names = generations[0].decoder.tool_format, {t["function"]["name"] for t in request.offered_tools}

        def answer(text: str) -> tuple[str | None, list[tools.ToolCall]]:
            return tools.parse(fmt, text, names) if fmt is not None else (text, [])

        generating.admit_all(generations)  # a full queue answers 429 before anything is sent
        if not stream:
            try:
                texts = await asyncio.gather(*(generating.text(g) for g in generations))
            finally:
                for generation in generations:
                    generation.cancel()
            choices = []
            for i, source in enumerate(_best(generations, request.n)):
                content, calls = answer(texts[source])
                finish = "tool_calls" if calls else generations[source].finish_reason
                choices.append(choice(i, echo + (content or "") if echo else content, finish, False, calls, source))
            return app.json({"id": ident, "object": kind, "created": created, "model": model, "choices": choices,
                             "usage": _usage(generations)})  # fmt: skip
        chunk = {"id": ident, "object": f"{kind}.chunk" if chat else kind, "created": created, "model": model}

        async def events() -> AsyncGenerator[dict[str, Any], None]:
            if chat:  # each choice's first chunk names the role, as OpenAI's do
                for index in range(len(generations)):
                    yield {**chunk, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]}  # fmt: skip
            if fmt is not None:  # a tool call is known only once the answer is whole: each choice is one delta
                texts = await asyncio.gather(*(generating.text(g) for g in generations))
                for index, text in enumerate(texts):
                    content, calls = answer(text)
                    yield {**chunk, "choices": [choice(index, content, None, True, calls)]}
                    finish = "tool_calls" if calls else generations[index].finish_reason
                    yield {**chunk, "choices": [choice(index, None, finish, delta=True)]}
                if include_usage:
                    yield {**chunk, "choices": [], "usage": _usage(generations)}
                return
            for index in range(len(generations) if echo else 0):  # the prompt first, as it was sent
                yield {**chunk, "choices": [{"index": index, "text": echo, "logprobs": None, "finish_reason": None}]}
            async for index, piece in _interleaved([generating.stream(g) for g in generations]):
                if piece is None:  # that choice is done
                    finish = generations[index].finish_reason
                    yield {**chunk, "choices": [choice(index, None if chat else "", finish, delta=True)]}
                else:
                    yield {**chunk, "choices": [choice(index, piece, None, delta=True)]}
            if include_usage:
                yield {**chunk, "choices": [], "usage": _usage(generations)}

        def cancel() -> None:
            for generation in generations:
                generation.cancel()

        return app.events(events(), openai=True, on_close=cancel)

    @staticmethod
    async def embeddings(app: RestApp, call: Call) -> Any:
        body = parse(EmbeddingRequest, codec.decode_object(await app.body(call)))
        name, version = _model_ref(app, call, body.model)
        texts, encoding = body.texts, body.encoding_format
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
        return app.json({"object": "list", "data": items, "model": body.model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip
