"""The Open Inference Protocol (KServe V2) over REST, with Triton's extensions: a route set on the HTTP kernel
(http.py) whose handlers decode, call the data plane, and encode (rest_codec.py)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from shipyard.serve.policy.auth import Action
from shipyard.serve.protocol.numbers import parse_count
from shipyard.serve.transports import rest_codec as codec
from shipyard.serve.transports.edge import HTTP_STATUS, public_error
from shipyard.serve.transports.http import (
    Answer,
    Api,
    Call,
    EventStream,
    Handler,
    HttpApp,
    Response,
    Route,
    json_answer,
)


def error_body(exc: BaseException, where: str) -> tuple[int, dict[str, Any]]:
    """An error as the protocol's status and {"error": message} body."""
    kind, message = public_error(exc, where)
    return HTTP_STATUS[kind], {"error": message}


def _model_routes(method: str, tail: str, action: Action, handler: Handler) -> list[Route]:
    """A per-model route, for the newest loaded version and for a given one."""
    return [Route(method, f"/v2/models/{{name}}{tail}", action, handler),
            Route(method, f"/v2/models/{{name}}/versions/{{version}}{tail}", action, handler)]  # fmt: skip


async def server_metadata(app: HttpApp, call: Call) -> Answer:
    return json_answer(codec.server_metadata(app.dataplane.server_metadata()))


async def live(app: HttpApp, call: Call) -> Answer:
    # The protocol: 200 means true, a 4xx means false (Triton answers 400 too).
    return json_answer({"live": True}, 200 if app.dataplane.live() else 400)


async def ready(app: HttpApp, call: Call) -> Answer:
    ok = await app.services.wide.ready()
    return json_answer({"ready": ok}, 200 if ok else 400)


async def all_statistics(app: HttpApp, call: Call) -> Answer:
    return json_answer(codec.statistics(await app.services.wide.statistics(None, None)))


async def model_metadata(app: HttpApp, call: Call) -> Answer:
    return json_answer(codec.model_metadata(app.dataplane.model_metadata(str(call.name), call.version)))


async def model_ready(app: HttpApp, call: Call) -> Answer:
    ready = await app.services.wide.model_ready(str(call.name), call.version)
    return json_answer({"name": call.name, "ready": ready}, 200 if ready else 400)


async def model_config(app: HttpApp, call: Call) -> Answer:
    return json_answer(codec.model_config(app.dataplane.model_config(str(call.name), call.version)))


async def model_statistics(app: HttpApp, call: Call) -> Answer:
    return json_answer(codec.statistics(await app.services.wide.statistics(call.name, call.version)))


async def drift(app: HttpApp, call: Call) -> Answer:
    return json_answer(await app.services.wide.drift(str(call.name), call.version))


async def feedback(app: HttpApp, call: Call) -> Answer:
    body = codec.decode_object(await app.body(call))
    items = body.get("items", [body])
    return json_answer(await app.services.wide.feedback(str(call.name), call.version,
                                                   items if isinstance(items, list) else [items]))  # fmt: skip


async def infer(app: HttpApp, call: Call) -> Answer:
    body = await app.body(call)
    header_length = None
    for key, value in call.scope["headers"]:
        if key == codec.HEADER_LENGTH.encode():
            header_length = parse_count(value, "Inference-Header-Content-Length")
    request = codec.decode_request(body, header_length)
    response = await app.dataplane.infer(str(call.name), call.version, request)
    payload, json_length = codec.encode_response(response, request)
    if json_length is None:
        return Response(200, payload)
    headers = [(b"content-type", b"application/octet-stream"),
               (codec.HEADER_LENGTH.encode(), str(json_length).encode())]  # fmt: skip
    return Response(200, payload, headers)


async def generate(app: HttpApp, call: Call) -> Answer:
    """Triton's generate extension: the whole text in one JSON answer."""
    request = codec.decode_generate(await app.body(call))
    generation = app.services.generation
    response = await generation.complete(await generation.start(str(call.name), call.version, request), request)
    return json_answer({"model_name": response.model_name, "model_version": response.model_version,
                  "text_output": response.outputs[0].data[0].decode(), **response.parameters})  # fmt: skip


async def generate_stream(app: HttpApp, call: Call) -> Answer:
    """Triton's generate extension as server-sent events, one per piece of text, then a final one."""
    request = codec.decode_generate(await app.body(call))
    generation = app.services.generation
    started = await generation.start(str(call.name), call.version, request)  # validated before the stream starts
    generation.admit(started)  # a full queue is refused before the stream starts
    model = {"model_name": started.decoder.name, "model_version": started.decoder.version}

    async def events() -> AsyncGenerator[dict[str, Any], None]:
        async for piece in generation.stream(started):
            yield {**model, "text_output": piece}
        yield {**model, "text_output": "", "final": True, **started.usage.parameters()}

    return EventStream(events(), on_close=started.cancel)


async def repository_index(app: HttpApp, call: Call) -> Answer:
    return json_answer(codec.repository_index(app.services.management.index()))


async def load(app: HttpApp, call: Call) -> Answer:
    await app.services.wide.load(str(call.name), codec.decode_parameters(await app.body(call)))
    return json_answer({})


async def unload(app: HttpApp, call: Call) -> Answer:
    await app.services.wide.unload(str(call.name), codec.decode_parameters(await app.body(call)))
    return json_answer({})


# Literal paths come before templates of the same length: /v2/models/stats is not a model named "stats".
ROUTES: list[Route] = [
    Route("GET", "/v2", "metadata", server_metadata),
    Route("GET", "/v2/health/live", "health", live),
    Route("GET", "/v2/health/ready", "health", ready),
    Route("GET", "/v2/models/stats", "index", all_statistics),
    Route("POST", "/v2/repository/index", "index", repository_index),
    Route("POST", "/v2/repository/models/{name}/load", "admin", load),
    Route("POST", "/v2/repository/models/{name}/unload", "admin", unload),
    *_model_routes("GET", "", "read", model_metadata),
    *_model_routes("GET", "/ready", "read", model_ready),
    *_model_routes("GET", "/config", "read", model_config),
    *_model_routes("GET", "/stats", "read", model_statistics),
    *_model_routes("GET", "/drift", "read", drift),
    *_model_routes("POST", "/infer", "infer", infer),
    *_model_routes("POST", "/generate", "infer", generate),
    *_model_routes("POST", "/generate_stream", "infer", generate_stream),
    *_model_routes("POST", "/feedback", "infer", feedback),
]
V2 = Api("/v2", ROUTES, error_body)
