"""The REST transport: a plain ASGI app that decodes, calls the data plane, and encodes.

No web framework: the routes are the fixed V2 paths, matched by splitting the path, which keeps
per-request overhead to a few microseconds. Error kinds become HTTP statuses here and only here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from shipyard.errors import ErrorKind, InvalidInputError, ShipyardError, TooLargeError
from shipyard.serve.dataplane import DataPlane
from shipyard.serve.guard import Action, Guard
from shipyard.serve.rest_codec import (
    HEADER_LENGTH,
    decode_generate,
    decode_object,
    decode_parameters,
    decode_request,
    encode_json,
    encode_response,
)

logger = logging.getLogger(__name__)


def _failure(exc: Exception, scope: Scope) -> tuple[int, str]:
    """An error's HTTP status and the message a client may see (internal details stay in the log)."""
    if isinstance(exc, ShipyardError):
        status = HTTP_STATUS[exc.kind]
        if status == 500:
            logger.error("internal error: %s", exc)
        return status, exc.message if status != 500 else "internal error"
    logger.error("unhandled error serving %s", scope.get("path"), exc_info=exc)
    return 500, "internal error"


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

HTTP_STATUS = {
    ErrorKind.INVALID: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.UNSAFE: 403,
    ErrorKind.FAILED_CHECK: 400,
    ErrorKind.CORRUPT: 500,
    ErrorKind.MISSING_DEPENDENCY: 500,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.OVERLOADED: 503,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.RATE_LIMITED: 429,
    ErrorKind.TIMEOUT: 504,
    ErrorKind.INTERNAL: 500,
}
_JSON = [(b"content-type", b"application/json")]


class _Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers or _JSON


class _EventStream:
    """A server-sent-events answer: each item of `events` becomes one `data:` event."""

    __slots__ = ("events",)

    def __init__(self, events: AsyncGenerator[dict[str, Any], None]) -> None:
        self.events = events


def _json(value: Any, status: int = 200) -> _Response:
    return _Response(status, encode_json(value))


def _error(status: int, message: str) -> _Response:
    return _Response(status, encode_json({"error": message}))


class RestApp:
    """ASGI application serving the Open Inference Protocol REST API."""

    def __init__(self, dataplane: DataPlane, max_body_bytes: int, guard: Guard | None = None) -> None:
        self.dataplane = dataplane
        self.max_body_bytes = max_body_bytes
        self.guard = guard or Guard()

    def _allow(self, scope: Scope, action: Action, model: str | None = None) -> None:
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        client = scope.get("client")
        self.guard.check(authorization, client[0] if client else "unknown", action, model)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            response = await self._route(scope, receive)
        except Exception as exc:  # every error becomes an answer; _failure logs the unexpected ones
            response = _error(*_failure(exc, scope))
        if isinstance(response, _EventStream):
            await self._send_events(response, scope, receive, send)
            return
        headers = [*response.headers, (b"content-length", str(len(response.body)).encode())]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    @staticmethod
    async def _send_events(stream: _EventStream, scope: Scope, receive: Receive, send: Send) -> None:
        """Send events as they come; stop generating when the client goes away (uvicorn drops writes to a
        closed connection silently, so the disconnect is watched on `receive`). An error after the start
        goes out as a last {"error": ...} event."""

        async def pump() -> None:
            try:
                async for event in stream.events:
                    await send({"type": "http.response.body", "body": b"data: " + encode_json(event) + b"\n\n",
                                "more_body": True})  # fmt: skip
            except Exception as exc:
                _, message = _failure(exc, scope)
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"data: " + encode_json({"error": message}) + b"\n\n"})  # fmt: skip
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

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                raise TooLargeError(f"request body of {int(value)} bytes exceeds the limit of {self.max_body_bytes}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidInputError("client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise TooLargeError(f"request body exceeds the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _route(self, scope: Scope, receive: Receive) -> _Response | _EventStream:
        parts = scope["path"].strip("/").split("/")
        method = scope["method"]
        if not parts or parts[0] != "v2":
            return _error(404, f"no route for {scope['path']}")
        rest = parts[1:]
        if rest in ([], [""]):
            self._allow(scope, "metadata")
            return self._get(method) or _json(self.dataplane.server_metadata())
        if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
            self._allow(scope, "health")
            if method != "GET":
                return _error(405, "use GET")
            ok = self.dataplane.live() if rest[1] == "live" else self.dataplane.ready()
            # The protocol: 200 means true, a 4xx means false (Triton answers 400 too).
            return _json({rest[1]: ok}, 200 if ok else 400)
        if rest[0] == "models":
            return await self._models(rest[1:], method, scope, receive)
        if rest[0] == "repository":
            return await self._repository(rest[1:], method, scope, receive)
        return _error(404, f"no route for {scope['path']}")

    @staticmethod
    def _get(method: str) -> _Response | None:
        return None if method == "GET" else _error(405, "use GET")

    async def _models(self, rest: list[str], method: str, scope: Scope, receive: Receive) -> _Response | _EventStream:
        if rest == ["stats"]:
            self._allow(scope, "index")
            return self._get(method) or _json(self.dataplane.model_statistics(None, None))
        if not rest or not rest[0]:
            return _error(404, "no model name in the path")
        name, version, tail = rest[0], None, rest[1:]
        self._allow(scope, "infer" if tail[-1:] in (["infer"], ["feedback"], ["generate"], ["generate_stream"])
                    else "read", name)  # fmt: skip
        if len(tail) >= 2 and tail[0] == "versions":
            version, tail = tail[1], tail[2:]
        action = tail[0] if len(tail) == 1 else ("" if not tail else None)
        if action == "infer":
            if method != "POST":
                return _error(405, "use POST")
            return await self._infer(name, version, scope, receive)
        if action in ("generate", "generate_stream"):
            if method != "POST":
                return _error(405, "use POST")
            return await self._generate(name, version, action == "generate_stream", scope, receive)
        if action == "":
            return self._get(method) or _json(self.dataplane.model_metadata(name, version))
        if action == "ready":
            ready = self.dataplane.model_ready(name, version)
            return self._get(method) or _json({"name": name, "ready": ready}, 200 if ready else 400)
        if action == "config":
            return self._get(method) or _json(self.dataplane.model_config(name, version))
        if action == "stats":
            return self._get(method) or _json(self.dataplane.model_statistics(name, version))
        if action == "drift":
            return self._get(method) or _json(self.dataplane.model_drift(name, version))
        if action == "feedback":
            if method != "POST":
                return _error(405, "use POST")
            body = decode_object(await self._body(scope, receive))
            items = body.get("items", [body])
            return _json(self.dataplane.feedback(name, version, items if isinstance(items, list) else [items]))
        return _error(404, f"no route for {scope['path']}")

    async def _infer(self, name: str, version: str | None, scope: Scope, receive: Receive) -> _Response:
        body = await self._body(scope, receive)
        header_length = None
        for key, value in scope["headers"]:
            if key == HEADER_LENGTH.encode():
                if not value.isdigit():
                    raise InvalidInputError("Inference-Header-Content-Length must be a number")
                header_length = int(value)
        request = decode_request(body, header_length)
        response = await self.dataplane.infer(name, version, request)
        payload, json_length = encode_response(response, request)
        if json_length is None:
            return _Response(200, payload)
        headers = [(b"content-type", b"application/octet-stream"), (HEADER_LENGTH.encode(), str(json_length).encode())]
        return _Response(200, payload, headers)

    async def _generate(
        self, name: str, version: str | None, stream: bool, scope: Scope, receive: Receive
    ) -> _Response | _EventStream:
        """Triton's generate extension: one JSON answer, or server-sent events, one per piece of text."""
        request = decode_generate(await self._body(scope, receive))
        if not stream:
            response = await self.dataplane.generate_text(name, version, request)
            text = response.outputs[0].data[0].decode()
            return _json({"model_name": response.model_name, "model_version": response.model_version,
                          "text_output": text, **response.parameters})  # fmt: skip
        generation = self.dataplane.generate(name, version, request)  # validated before the stream starts
        model = {"model_name": generation.generator.name, "model_version": generation.generator.version}

        async def events() -> AsyncGenerator[dict[str, Any], None]:
            async for piece in self.dataplane.stream(generation):
                yield {**model, "text_output": piece}
            yield {**model, "text_output": "", "final": True, **generation.usage.parameters()}

        return _EventStream(events())

    async def _repository(self, rest: list[str], method: str, scope: Scope, receive: Receive) -> _Response:
        if method != "POST":
            return _error(405, "use POST")
        if rest == ["index"]:
            self._allow(scope, "index")
            return _json(self.dataplane.repository_index())
        if len(rest) == 3 and rest[0] == "models" and rest[2] in ("load", "unload"):
            self._allow(scope, "admin")
            body = await self._body(scope, receive)
            parameters = decode_parameters(body)
            if rest[2] == "load":
                await self.dataplane.load_model(rest[1], parameters)
            else:
                await self.dataplane.unload_model(rest[1], parameters)
            return _json({})
        return _error(404, "no such repository route")
