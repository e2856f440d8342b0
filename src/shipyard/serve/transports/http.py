"""The HTTP kernel under every REST route set: a plain ASGI app that matches routes, authenticates a request
once, reads bodies within their limits, and turns errors into each API's own error shape.

Route sets (V2 in v2.py, OpenAI's in openai.py) declare each route once, with its method, path template and
the access action it needs, so a new endpoint cannot get a scope by accident; they import this module, never
each other. No web framework: matching a request is a split of its path and a comparison with the templates
of that length (a few microseconds), which is the whole of the per-request routing cost.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from shipyard.errors import IncompleteRequestError, InvalidInputError, NotFoundError, TooLargeError
from shipyard.serve.core.services import Services
from shipyard.serve.policy.auth import AccessControl, Action, TokenEntry
from shipyard.serve.protocol.numbers import parse_count
from shipyard.serve.transports import rest_codec as codec

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
_JSON = [(b"content-type", b"application/json")]


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers or _JSON


class EventStream:
    """A server-sent-events answer: each item of `events` becomes one `data:` event; an error after the start
    becomes a last event in the API's error shape, and the API's end marker (if any) closes the stream."""

    __slots__ = ("events", "on_close")

    def __init__(
        self, events: AsyncGenerator[dict[str, Any], None], on_close: Callable[[], None] | None = None
    ) -> None:
        self.events = events
        self.on_close = on_close  # runs however the stream ends, even if it never started (a client gone at once)


Answer = Response | EventStream
PARAMETER = "{}"  # the shape key of a template whose last segment is a parameter


def json_answer(value: Any, status: int = 200) -> Response:
    return Response(status, codec.encode_json(value))


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


class MethodNotAllowedError(Exception):
    """The path names a route, but not for this method (405, with the methods it takes)."""

    def __init__(self, allowed: list[str]) -> None:
        super().__init__(allowed)
        self.allowed = allowed


class Call(NamedTuple):  # a tuple: built for every request, so as cheap to make as possible
    """One matched request: its ASGI scope and receive channel, and the path's parameters."""

    scope: Scope
    receive: Receive
    name: str | None = None  # {name} in the path
    version: str | None = None  # {version} in the path
    caller: TokenEntry | None = None  # the token that authenticated it (None without tokens)


Handler = Callable[["HttpApp", Call], Awaitable[Answer]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # segments, with {name} and {version} as parameters
    action: Action
    handler: Handler

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.strip("/").split("/"))


@dataclass(frozen=True)
class Api:
    """One route set and how its errors leave: `error` gives the status and JSON body of an exception raised
    under `prefix` (or of a stream that fails after it started); `stream_end` is the data of a last event."""

    prefix: str
    routes: Sequence[Route]
    error: Callable[[BaseException, str], tuple[int, dict[str, Any]]]
    stream_end: bytes | None = None


class HttpApp:
    """The ASGI application serving every route set; the first is the default for paths no route set claims."""

    def __init__(self, services: Services, access: AccessControl, apis: Sequence[Api], max_body_bytes: int,
                 body_timeout_s: float) -> None:  # fmt: skip
        self.services = services
        self.dataplane = services.dataplane
        self.access = access
        self.apis = apis
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s  # a body that promises more bytes than it sends must not hold a slot
        # Routes by (segment count, last segment), each list followed by the templates of that length that end
        # in a parameter: a request compares itself with one or two templates.
        shapes: dict[tuple[int, str], list[tuple[Route, tuple[str, ...]]]] = {}
        for route in (route for api in apis for route in api.routes):
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
        path = scope.get("path", "")
        api = next((api for api in self.apis if path.startswith(api.prefix)), self.apis[0])
        try:
            response = await self._dispatch(scope, receive)
        except MethodNotAllowedError as exc:
            body = api.error(InvalidInputError(f"use {' or '.join(exc.allowed)}"), path)[1]
            response = Response(405, codec.encode_json(body), [*_JSON, (b"allow", ", ".join(exc.allowed).encode())])
        except Exception as exc:  # every error becomes an answer in its API's shape
            status, body = api.error(exc, path)
            response = Response(status, codec.encode_json(body))
        if isinstance(response, EventStream):
            await self._send_events(response, api, scope, receive, send)
            return
        headers = [*response.headers, (b"content-length", str(len(response.body)).encode())]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    def _match(self, path: str, method: str) -> tuple[Route, dict[str, str]]:
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
            raise MethodNotAllowedError(sorted(set(allowed)))
        raise NotFoundError(f"no route for {path}")

    async def _dispatch(self, scope: Scope, receive: Receive) -> Answer:
        route, params = self._match(scope["path"], scope["method"])
        name = params.get("name")
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        client = scope.get("client")
        # An OpenAI model id pins a version as NAME:VERSION or NAME@ALIAS; scopes name models, and registry
        # names cannot contain either character.
        model = None if name is None else name.partition(":")[0].partition("@")[0]
        caller = self.access.check(authorization, client[0] if client else "unknown", route.action, model)
        return await route.handler(self, Call(scope, receive, name, params.get("version"), caller))

    @staticmethod
    async def _send_events(stream: EventStream, api: Api, scope: Scope, receive: Receive, send: Send) -> None:
        """Send events as they come; stop generating when the client goes away (uvicorn drops writes to a
        closed connection silently, so the disconnect is watched on `receive`). An error after the start
        goes out as a last {"error": ...} event."""

        async def pump() -> None:
            try:
                async for event in stream.events:
                    await send({"type": "http.response.body", "body": b"data: " + codec.encode_json(event) + b"\n\n",
                                "more_body": True})  # fmt: skip
            except Exception as exc:
                body = api.error(exc, scope.get("path", ""))[1]
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"data: " + codec.encode_json(body) + b"\n\n"})  # fmt: skip
            if api.stream_end is not None:
                await send({"type": "http.response.body", "body": b"data: " + api.stream_end + b"\n\n",
                            "more_body": True})  # fmt: skip
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

    # --- what route sets' handlers use ---------------------------------------------------------------

    def check_model(self, call: Call, model: str) -> None:
        """Access to a model named in the body, not the path (the OpenAI routes)."""
        self.access.check_model(call.caller, "infer", model)

    def may_infer(self, call: Call, model: str) -> bool:
        """Whether the caller's token may infer the model (what a listing shows it)."""
        return self.access.permits_model(call.caller, "infer", model)
