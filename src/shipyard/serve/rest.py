"""The REST transport: a plain ASGI app that decodes, calls the data plane, and encodes.

No web framework: the routes are the fixed V2 paths, matched by splitting the path, which keeps
per-request overhead to a few microseconds. Error kinds become HTTP statuses here and only here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from shipyard.errors import ErrorKind, InvalidInputError, ShipyardError, TooLargeError
from shipyard.serve.dataplane import DataPlane
from shipyard.serve.guard import Action, Guard
from shipyard.serve.rest_codec import (
    HEADER_LENGTH,
    decode_object,
    decode_parameters,
    decode_request,
    encode_json,
    encode_response,
)

logger = logging.getLogger(__name__)

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
        except ShipyardError as exc:
            status = HTTP_STATUS[exc.kind]
            message = exc.message if status != 500 else "internal error"
            if status == 500:
                logger.error("internal error: %s", exc)
            response = _error(status, message)
        except Exception:
            logger.exception("unhandled error serving %s", scope.get("path"))
            response = _error(500, "internal error")
        headers = [*response.headers, (b"content-length", str(len(response.body)).encode())]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

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

    async def _route(self, scope: Scope, receive: Receive) -> _Response:
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

    async def _models(self, rest: list[str], method: str, scope: Scope, receive: Receive) -> _Response:
        if rest == ["stats"]:
            self._allow(scope, "index")
            return self._get(method) or _json(self.dataplane.model_statistics(None, None))
        if not rest or not rest[0]:
            return _error(404, "no model name in the path")
        name, version, tail = rest[0], None, rest[1:]
        self._allow(scope, "infer" if tail[-1:] in (["infer"], ["feedback"]) else "read", name)
        if len(tail) >= 2 and tail[0] == "versions":
            version, tail = tail[1], tail[2:]
        action = tail[0] if len(tail) == 1 else ("" if not tail else None)
        if action == "infer":
            if method != "POST":
                return _error(405, "use POST")
            return await self._infer(name, version, scope, receive)
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
