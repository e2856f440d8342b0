"""The REST transport: a plain ASGI app that decodes, calls the data plane, and encodes.

Every route is declared once in ROUTES with its method, path template and the access action it needs, so
a new endpoint cannot get a scope by accident. No web framework: matching a request is a split of its
path and a comparison with the templates of that length (a few microseconds), which is the whole of the
per-request routing cost. Error kinds become HTTP statuses here, through edge.py.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from shipyard.errors import IncompleteRequestError, InvalidInputError, TooLargeError
from shipyard.serve.core.services import Services
from shipyard.serve.policy.auth import AccessControl, Action, TokenEntry
from shipyard.serve.protocol.numbers import parse_count
from shipyard.serve.transports import openai
from shipyard.serve.transports import rest_codec as codec
from shipyard.serve.transports.edge import HTTP_STATUS, public_error

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
_JSON = [(b"content-type", b"application/json")]


class _Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers or _JSON


class _EventStream:
    """A server-sent-events answer: each item of `events` becomes one `data:` event; OpenAI's streams end
    with `data: [DONE]` and carry errors in its shape."""

    __slots__ = ("events", "on_close", "openai")

    def __init__(
        self, events: AsyncGenerator[dict[str, Any], None], openai: bool = False,
        on_close: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self.events, self.openai = events, openai
        self.on_close = on_close  # runs however the stream ends, even if it never started (a client gone at once)


Answer = _Response | _EventStream
PARAMETER = "{}"  # the shape key of a template whose last segment is a parameter


def _json(value: Any, status: int = 200) -> _Response:
    return _Response(status, codec.encode_json(value))


def _error(status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> _Response:
    return _Response(status, codec.encode_json({"error": message}), [*_JSON, *(headers or [])])


_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}  # HTTP's deflate is the zlib format


def _decompress(body: bytes, encoding: bytes, limit: int) -> bytes:
    """A Content-Encoding'd body, never inflated past `limit` bytes (a small bomb gets 413, not memory)."""
    wbits = _WBITS.get(encoding)
    if wbits is None:
        name = encoding.decode("latin-1")
        raise InvalidInputError(f"Content-Encoding {name!r} is not supported: use gzip or deflate")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInputError(f"the body is not valid {encoding.decode()} data: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise TooLargeError(f"the decompressed request body exceeds the limit of {limit} bytes")
    if not inflater.eof:
        raise InvalidInputError(f"the {encoding.decode()} body ends before its compressed stream does")
    return data


class Call(NamedTuple):  # a tuple: built for every request, so as cheap to make as possible
    """One matched request: its ASGI scope and receive channel, and the path's parameters."""

    scope: Scope
    receive: Receive
    name: str | None = None  # {name} in the path
    version: str | None = None  # {version} in the path
    caller: TokenEntry | None = None  # the token that authenticated it (None without tokens)


Handler = Callable[["RestApp", Call], Awaitable[Answer]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # segments, with {name} and {version} as parameters
    action: Action
    handler: Handler

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.strip("/").split("/"))


def _model_routes(method: str, tail: str, action: Action, handler: Handler) -> list[Route]:
    """A per-model route, for the newest loaded version and for a given one."""
    return [Route(method, f"/v2/models/{{name}}{tail}", action, handler),
            Route(method, f"/v2/models/{{name}}/versions/{{version}}{tail}", action, handler)]  # fmt: skip


class RestApp:
    """ASGI application serving the Open Inference Protocol REST API and its extensions."""

    def __init__(self, services: Services, access: AccessControl, max_body_bytes: int, body_timeout_s: float) -> None:
        self.services = services
        self.dataplane = services.dataplane
        self.access = access
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s  # a body that promises more bytes than it sends must not hold a slot
        # Routes by (segment count, last segment), each list followed by the templates of that length that end
        # in a parameter: a request compares itself with one or two templates.
        shapes: dict[tuple[int, str], list[tuple[Route, tuple[str, ...]]]] = {}
        for route in ROUTES:
            last = route.segments[-1]
            shapes.setdefault((len(route.segments), PARAMETER if last[0] == "{" else last), []).append(
                (route, route.segments)
            )
        self._by_shape = {(n, last): [*routes, *shapes.get((n, PARAMETER), [])] if last != PARAMETER else routes
                          for (n, last), routes in shapes.items()}  # fmt: skip
        # Body reads in progress (task -> loop deadline), timed out by one watchdog rather than a timer each:
        # an asyncio.timeout per request costs ~6 us, a tenth of a small model's whole request on one core.
        self._reading: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._watched: asyncio.AbstractEventLoop | None = None  # the loop the watchdog runs on
        self._watchdog: asyncio.Task[None] | None = None  # referenced so it is not collected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            response = await self._dispatch(scope, receive)
        except Exception as exc:  # every error becomes an answer; public_error logs the unexpected ones
            path = scope.get("path", "")
            if path.startswith(openai.PREFIX):
                status, body = openai.error_body(exc, path)
                response = _Response(status, codec.encode_json(body))
            else:
                kind, message = public_error(exc, path)
                response = _error(HTTP_STATUS[kind], message)
        if isinstance(response, _EventStream):
            await self._send_events(response, scope, receive, send)
            return
        headers = [*response.headers, (b"content-length", str(len(response.body)).encode())]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    def _match(self, path: str, method: str) -> tuple[Route, dict[str, str]] | _Response:
        parts = path.strip("/").split("/")
        allowed: list[str] = []
        shape = self._by_shape.get((len(parts), parts[-1])) or self._by_shape.get((len(parts), PARAMETER), [])
        for route, template in shape:
            params: dict[str, str] = {}
            for want, got in zip(template, parts, strict=True):
                if want[0] == "{":
                    if not got:
                        break
                    params[want[1:-1]] = got
                elif want != got:
                    break
            else:
                if route.method == method:
                    return route, params
                allowed.append(route.method)
        if allowed:
            return _error(405, f"use {' or '.join(sorted(set(allowed)))}", [(b"allow", ", ".join(allowed).encode())])
        return _error(404, f"no route for {path}")

    async def _dispatch(self, scope: Scope, receive: Receive) -> Answer:
        matched = self._match(scope["path"], scope["method"])
        if isinstance(matched, _Response):
            return matched
        route, params = matched
        name = params.get("name")
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        client = scope.get("client")
        # An OpenAI model id pins a version as NAME:VERSION or NAME@ALIAS; scopes name models, and registry
        # names cannot contain either character.
        model = None if name is None else name.partition(":")[0].partition("@")[0]
        caller = self.access.check(authorization, client[0] if client else "unknown", route.action, model)
        return await route.handler(self, Call(scope, receive, name, params.get("version"), caller))

    @staticmethod
    async def _send_events(stream: _EventStream, scope: Scope, receive: Receive, send: Send) -> None:
        """Send events as they come; stop generating when the client goes away (uvicorn drops writes to a
        closed connection silently, so the disconnect is watched on `receive`). An error after the start
        goes out as a last {"error": ...} event."""

        async def pump() -> None:
            try:
                async for event in stream.events:
                    await send({"type": "http.response.body", "body": b"data: " + codec.encode_json(event) + b"\n\n",
                                "more_body": True})  # fmt: skip
            except Exception as exc:
                path = scope.get("path", "")
                body = openai.error_body(exc, path)[1] if stream.openai else {"error": public_error(exc, path)[1]}
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"data: " + codec.encode_json(body) + b"\n\n"})  # fmt: skip
            if stream.openai:
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b""})

        async def disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        tasks = [asyncio.create_task(pump()), asyncio.create_task(disconnect())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await stream.events.aclose()
            if stream.on_close is not None:
                stream.on_close()

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def body(self, call: Call) -> bytes:
        """The whole request body, decompressed (gzip, deflate); 413 as soon as it, sent or decompressed,
        passes the limit; 408 when it has not all arrived within the body timeout."""
        encoding = b""
        for key, value in call.scope["headers"]:
            if key == b"content-length" and parse_count(value, "Content-Length") > self.max_body_bytes:
                raise TooLargeError(f"request body of {int(value)} bytes exceeds the limit of {self.max_body_bytes}")
            if key == b"content-encoding":
                encoding = value.strip().lower()
        loop = asyncio.get_running_loop()
        if self._watched is not loop:  # one watchdog per event loop, started with the first body read
            self._watched = loop
            self._watchdog = loop.create_task(self._watch_body_reads(), name="body-timeouts")
        task = asyncio.current_task()
        assert task is not None
        self._reading[task] = loop.time() + self.body_timeout_s
        chunks, size = [], 0
        try:
            while True:
                message = await call.receive()
                if message["type"] == "http.disconnect":
                    raise InvalidInputError("client disconnected")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise TooLargeError(f"request body exceeds the limit of {self.max_body_bytes} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            self._expired.discard(task)
            task.uncancel()
            raise IncompleteRequestError(
                f"the request body did not arrive within {self.body_timeout_s:g} s (Content-Length larger than "
                "what was sent?)"
            ) from None
        finally:
            del self._reading[task]
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return body if encoding in (b"", b"identity") else _decompress(body, encoding, self.max_body_bytes)

    async def _watch_body_reads(self) -> None:
        """Cancel body reads past their deadline (checked a few times per timeout period)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.body_timeout_s / 4))
            now = loop.time()
            for task, deadline in list(self._reading.items()):
                if deadline <= now and task not in self._expired:
                    self._expired.add(task)
                    task.cancel()

    # --- what handlers (here and in openai.py) build answers with ------------------------------

    @staticmethod
    def json(value: Any, status: int = 200) -> Answer:
        return _json(value, status)

    @staticmethod
    def events(
        events: AsyncGenerator[dict[str, Any], None], openai: bool = False, on_close: Callable[[], None] | None = None
    ) -> Answer:
        return _EventStream(events, openai, on_close)

    def check_model(self, call: Call, model: str) -> None:
        """Access to a model named in the body, not the path (the OpenAI routes)."""
        self.access.check_model(call.caller, "infer", model)

    def may_infer(self, call: Call, model: str) -> bool:
        """Whether the caller's token may infer the model (what a listing shows it)."""
        return self.access.permits_model(call.caller, "infer", model)

    # --- handlers: one per route ---------------------------------------------------------------

    async def server_metadata(self, call: Call) -> Answer:
        return _json(codec.server_metadata(self.dataplane.server_metadata()))

    async def live(self, call: Call) -> Answer:
        # The protocol: 200 means true, a 4xx means false (Triton answers 400 too).
        return _json({"live": True}, 200 if self.dataplane.live() else 400)

    async def ready(self, call: Call) -> Answer:
        ok = await self.services.wide.ready()
        return _json({"ready": ok}, 200 if ok else 400)

    async def all_statistics(self, call: Call) -> Answer:
        return _json(codec.statistics(await self.services.wide.statistics(None, None)))

    async def model_metadata(self, call: Call) -> Answer:
        return _json(codec.model_metadata(self.dataplane.model_metadata(str(call.name), call.version)))

    async def model_ready(self, call: Call) -> Answer:
        ready = await self.services.wide.model_ready(str(call.name), call.version)
        return _json({"name": call.name, "ready": ready}, 200 if ready else 400)

    async def model_config(self, call: Call) -> Answer:
        return _json(codec.model_config(self.dataplane.model_config(str(call.name), call.version)))

    async def model_statistics(self, call: Call) -> Answer:
        return _json(codec.statistics(await self.services.wide.statistics(call.name, call.version)))

    async def drift(self, call: Call) -> Answer:
        return _json(await self.services.wide.drift(str(call.name), call.version))

    async def feedback(self, call: Call) -> Answer:
        body = codec.decode_object(await self.body(call))
        items = body.get("items", [body])
        return _json(await self.services.wide.feedback(str(call.name), call.version,
                                                       items if isinstance(items, list) else [items]))  # fmt: skip

    async def infer(self, call: Call) -> Answer:
        body = await self.body(call)
        header_length = None
        for key, value in call.scope["headers"]:
            if key == codec.HEADER_LENGTH.encode():
                header_length = parse_count(value, "Inference-Header-Content-Length")
        request = codec.decode_request(body, header_length)
        response = await self.dataplane.infer(str(call.name), call.version, request)
        payload, json_length = codec.encode_response(response, request)
        if json_length is None:
            return _Response(200, payload)
        headers = [(b"content-type", b"application/octet-stream"),
                   (codec.HEADER_LENGTH.encode(), str(json_length).encode())]  # fmt: skip
        return _Response(200, payload, headers)

    async def generate(self, call: Call) -> Answer:
        """Triton's generate extension: the whole text in one JSON answer."""
        request = codec.decode_generate(await self.body(call))
        generation = self.services.generation
        response = await generation.complete(await generation.start(str(call.name), call.version, request), request)
        return _json({"model_name": response.model_name, "model_version": response.model_version,
                      "text_output": response.outputs[0].data[0].decode(), **response.parameters})  # fmt: skip

    async def generate_stream(self, call: Call) -> Answer:
        """Triton's generate extension as server-sent events, one per piece of text, then a final one."""
        request = codec.decode_generate(await self.body(call))
        generation = self.services.generation
        started = await generation.start(str(call.name), call.version, request)  # validated before the stream starts
        generation.admit(started)  # a full queue is refused before the stream starts
        model = {"model_name": started.decoder.name, "model_version": started.decoder.version}

        async def events() -> AsyncGenerator[dict[str, Any], None]:
            async for piece in generation.stream(started):
                yield {**model, "text_output": piece}
            yield {**model, "text_output": "", "final": True, **started.usage.parameters()}

        return _EventStream(events(), on_close=started.cancel)

    async def repository_index(self, call: Call) -> Answer:
        return _json(codec.repository_index(self.services.management.index()))

    async def load(self, call: Call) -> Answer:
        await self.services.wide.load(str(call.name), codec.decode_parameters(await self.body(call)))
        return _json({})

    async def unload(self, call: Call) -> Answer:
        await self.services.wide.unload(str(call.name), codec.decode_parameters(await self.body(call)))
        return _json({})


# Literal paths come before templates of the same length: /v2/models/stats is not a model named "stats".
ROUTES: list[Route] = [
    Route("GET", "/v2", "metadata", RestApp.server_metadata),
    Route("GET", "/v2/health/live", "health", RestApp.live),
    Route("GET", "/v2/health/ready", "health", RestApp.ready),
    Route("GET", "/v2/models/stats", "index", RestApp.all_statistics),
    Route("POST", "/v2/repository/index", "index", RestApp.repository_index),
    Route("POST", "/v2/repository/models/{name}/load", "admin", RestApp.load),
    Route("POST", "/v2/repository/models/{name}/unload", "admin", RestApp.unload),
    *_model_routes("GET", "", "read", RestApp.model_metadata),
    *_model_routes("GET", "/ready", "read", RestApp.model_ready),
    *_model_routes("GET", "/config", "read", RestApp.model_config),
    *_model_routes("GET", "/stats", "read", RestApp.model_statistics),
    *_model_routes("GET", "/drift", "read", RestApp.drift),
    *_model_routes("POST", "/infer", "infer", RestApp.infer),
    *_model_routes("POST", "/generate", "infer", RestApp.generate),
    *_model_routes("POST", "/generate_stream", "infer", RestApp.generate_stream),
    *_model_routes("POST", "/feedback", "infer", RestApp.feedback),
    # OpenAI's API: the model is named in the body, and checked there (RestApp.check_model)
    Route("GET", "/v1/models", "read", openai.OpenAIRoutes.models),
    Route("GET", "/v1/models/{name}", "read", openai.OpenAIRoutes.model),
    Route("POST", "/v1/completions", "infer", openai.OpenAIRoutes.completions),
    Route("POST", "/v1/chat/completions", "infer", openai.OpenAIRoutes.chat_completions),
    Route("POST", "/v1/embeddings", "infer", openai.OpenAIRoutes.embeddings),
]
