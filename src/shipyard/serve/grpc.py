"""The gRPC transport: Triton/KServe's GRPCInferenceService over grpc.aio, using tritonclient's stubs.

Messages are converted to the domain types and back; error kinds become gRPC status codes here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from shipyard.errors import ErrorKind, InvalidInputError, ShipyardError
from shipyard.serve.dataplane import DataPlane
from shipyard.serve.datatypes import from_list, from_raw, to_raw
from shipyard.serve.generation import Generation
from shipyard.serve.guard import Action, Guard
from shipyard.serve.types import InferRequest, InferResponse, RequestedOutput, Tensor

logger = logging.getLogger(__name__)

GRPC_STATUS = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.CONFLICT: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.UNSAFE: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.FAILED_CHECK: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.CORRUPT: grpc.StatusCode.INTERNAL,
    ErrorKind.MISSING_DEPENDENCY: grpc.StatusCode.INTERNAL,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip

T = TypeVar("T")


def _parameters(params: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        which = value.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(value, which)
    return out


def decode_infer(message: service_pb2.ModelInferRequest) -> InferRequest:
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidInputError(f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs")
    inputs = []
    for i, item in enumerate(message.inputs):
        shape = list(item.shape)
        if raw:
            data = from_raw(item.datatype, shape, raw[i])
        else:
            field = _CONTENTS_FIELD.get(item.datatype)
            if field is None:
                raise InvalidInputError(f"input {item.name!r}: {item.datatype} needs raw_input_contents")
            data = from_list(item.datatype, shape, list(getattr(item.contents, field)))
        inputs.append(Tensor(item.name, item.datatype, shape, data, _parameters(item.parameters)))
    outputs = [RequestedOutput(o.name, _parameters(o.parameters)) for o in message.outputs] or None
    return InferRequest(inputs, outputs, message.id or None, _parameters(message.parameters))


def encode_infer(response: InferResponse) -> service_pb2.ModelInferResponse:
    message = service_pb2.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id or ""
    )
    for out in response.outputs:
        message.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        message.raw_output_contents.append(to_raw(out.datatype, out.data))
    return message


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """GRPCInferenceService over the data plane."""

    def __init__(self, dataplane: DataPlane, guard: Guard) -> None:
        self.dp = dataplane
        self.guard = guard

    def _allow(self, context: grpc.aio.ServicerContext, action: Action, model: str | None = None) -> None:
        metadata = dict(context.invocation_metadata() or ())
        authorization = metadata.get("authorization")
        peer = context.peer() or "unknown"  # "ipv4:127.0.0.1:54321": the address without the port
        caller = peer.rsplit(":", 1)[0]
        self.guard.check(authorization if isinstance(authorization, str) else None, caller, action, model)

    async def _call(
        self, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]], action: Action, model: str | None
    ) -> T:
        try:
            self._allow(context, action, model)
            return await fn()
        except ShipyardError as exc:
            code = GRPC_STATUS[exc.kind]
            if code == grpc.StatusCode.INTERNAL:
                logger.error("internal error: %s", exc)
            await context.abort(code, exc.message if code != grpc.StatusCode.INTERNAL else "internal error")
        except grpc.aio.AbortError:
            raise
        except Exception:
            logger.exception("unhandled gRPC error")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("context.abort returns only by raising")

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC method names)
        async def run() -> Any:
            return service_pb2.ServerLiveResponse(live=self.dp.live())

        return await self._call(context, run, "health", None)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            return service_pb2.ServerReadyResponse(ready=self.dp.ready())

        return await self._call(context, run, "health", None)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            return service_pb2.ServerMetadataResponse(**self.dp.server_metadata())

        return await self._call(context, run, "metadata", None)

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            return service_pb2.ModelReadyResponse(ready=self.dp.model_ready(request.name, request.version or None))

        return await self._call(context, run, "read", request.name)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            meta = self.dp.model_metadata(request.name, request.version or None)
            return json_format.ParseDict(meta, service_pb2.ModelMetadataResponse())

        return await self._call(context, run, "read", request.name)

    async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            config = self.dp.model_config(request.name, request.version or None)
            proto = json_format.ParseDict(config, model_config_pb2.ModelConfig())
            return service_pb2.ModelConfigResponse(config=proto)

        return await self._call(context, run, "read", request.name)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            stats = self.dp.model_statistics(request.name or None, request.version or None)
            return json_format.ParseDict(stats, service_pb2.ModelStatisticsResponse())

        return await self._call(context, run, "read" if request.name else "index", request.name or None)

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            return json_format.ParseDict({"models": self.dp.repository_index()}, service_pb2.RepositoryIndexResponse())

        return await self._call(context, run, "index", None)

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            await self.dp.load_model(request.model_name, _parameters(request.parameters))
            return service_pb2.RepositoryModelLoadResponse()

        return await self._call(context, run, "admin", None)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            await self.dp.unload_model(request.model_name, _parameters(request.parameters))
            return service_pb2.RepositoryModelUnloadResponse()

        return await self._call(context, run, "admin", None)

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            response = await self.dp.infer(request.model_name, request.model_version or None, decode_infer(request))
            return encode_infer(response)

        return await self._call(context, run, "infer", request.model_name)

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        # Errors go into the stream (Triton's ModelStreamInferResponse.error_message), which keeps it open.
        async for request in request_iterator:
            try:
                self._allow(context, "infer", request.model_name)
                name, version = request.model_name, request.model_version or None
                if self.dp.generates(name, version):
                    async for message in self._generation(name, version, decode_infer(request)):
                        yield message
                    continue
                response = await self.dp.infer(name, version, decode_infer(request))
                yield service_pb2.ModelStreamInferResponse(infer_response=encode_infer(response))
            except ShipyardError as exc:
                message = exc.message if GRPC_STATUS[exc.kind] != grpc.StatusCode.INTERNAL else "internal error"
                yield service_pb2.ModelStreamInferResponse(error_message=message)
            except Exception:
                logger.exception("unhandled stream error")
                yield service_pb2.ModelStreamInferResponse(error_message="internal error")

    async def _generation(self, name: str, version: str | None, request: InferRequest) -> AsyncIterator[Any]:
        """A language model's answer as decoupled responses: one per piece of text, the last marked final
        (or an empty final one, when the client asked with triton_enable_empty_final_response)."""
        generation = self.dp.generate(name, version, request)
        empty_final = bool(request.parameters.get("triton_enable_empty_final_response", False))
        held: str | None = None  # one piece behind, so the last one can carry the final flag
        async for piece in self.dp.stream(generation):
            if held is not None:
                yield _piece(generation, request, held, final=False)
            held = piece
        if held is not None:
            yield _piece(generation, request, held, final=not empty_final)
        if held is None or empty_final:
            yield _piece(generation, request, None, final=True)


def _piece(generation: Generation, request: InferRequest, text: str | None, final: bool) -> Any:
    response = service_pb2.ModelInferResponse(
        model_name=generation.generator.name, model_version=generation.generator.version, id=request.id or ""
    )
    if text is not None:
        response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
        response.raw_output_contents.append(to_raw("BYTES", np.array([text.encode()], dtype=object)))
    response.parameters["triton_final_response"].bool_param = final
    if final:
        for key, value in generation.usage.parameters().items():
            response.parameters[key].int64_param = value
    return service_pb2.ModelStreamInferResponse(infer_response=response)


_MALFORMED = "malformed request: not a valid protobuf message for this method"


def _lenient(message_class: Any) -> Callable[[bytes], Any]:
    """Parse a request, or return None: grpc.aio turns a parse error into UNKNOWN plus a logged traceback."""

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError:
            return None

    return parse


def _unary(method: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    async def handle(request: Any, context: Any) -> Any:
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _MALFORMED)
        return await method(request, context)

    return handle


def _streaming(method: Callable[[Any, Any], AsyncIterator[Any]]) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def handle(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                if request is None:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _MALFORMED)
                yield request

        async for response in method(checked(), context):
            yield response

    return handle


def add_servicer(server: grpc.aio.Server, dataplane: DataPlane, guard: Guard) -> None:
    """Register every method of the service from its descriptor, with requests parsed leniently."""
    servicer = InferenceServicer(dataplane, guard)
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        request_class = getattr(service_pb2, method.input_type.name)
        response_class = getattr(service_pb2, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        if method.client_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _streaming(behaviour), _lenient(request_class), response_class.SerializeToString
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(behaviour), _lenient(request_class), response_class.SerializeToString
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
