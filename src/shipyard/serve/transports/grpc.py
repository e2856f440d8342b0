"""The gRPC transport: Triton/KServe's GRPCInferenceService over grpc.aio, using tritonclient's stubs.

Messages are converted to the domain types and back, protobuf built here from the data plane's objects;
error kinds become gRPC status codes here, through edge.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from shipyard.errors import InvalidInputError
from shipyard.serve.core.decoder import Generation
from shipyard.serve.core.services import Services
from shipyard.serve.policy.auth import AccessControl, Action
from shipyard.serve.protocol.tensors import from_list, from_raw, to_raw
from shipyard.serve.protocol.types import (
    ConfigTensor,
    Duration,
    InferRequest,
    InferResponse,
    ModelConfig,
    ModelStatistics,
    RequestedOutput,
    Tensor,
    TensorMetadata,
)
from shipyard.serve.transports.edge import GRPC_STATUS, public_error

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


def _tensor_metadata(t: TensorMetadata) -> Any:
    return service_pb2.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)


def _config_tensors(kind: Any, items: list[ConfigTensor]) -> list[Any]:
    return [kind(name=t.name, data_type=mc.DataType.Value(t.data_type), dims=t.dims) for t in items]


def encode_config(config: ModelConfig) -> Any:
    message = mc.ModelConfig(
        name=config.name, platform=config.platform, backend=config.backend,
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
        max_batch_size=config.max_batch_size,
        input=_config_tensors(mc.ModelInput, config.inputs), output=_config_tensors(mc.ModelOutput, config.outputs),
        instance_group=[mc.ModelInstanceGroup(name=config.name, kind=mc.ModelInstanceGroup.KIND_CPU,
                                              count=config.instances)],
    )  # fmt: skip
    if config.dynamic_batching:
        message.dynamic_batching.CopyFrom(mc.ModelDynamicBatching(
            preferred_batch_size=config.preferred_batch_sizes,
            max_queue_delay_microseconds=config.max_queue_delay_us,
        ))  # fmt: skip
    return message


def _duration(d: Duration) -> Any:
    return service_pb2.StatisticDuration(count=d.count, ns=d.ns)


def encode_statistics(stats: list[ModelStatistics]) -> Any:
    return service_pb2.ModelStatisticsResponse(model_stats=[service_pb2.ModelStatistics(
        name=s.name, version=s.version, last_inference=s.last_inference_ms, inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=service_pb2.InferStatistics(
            success=_duration(s.success), fail=_duration(s.fail), queue=_duration(s.queue),
            compute_input=_duration(s.compute_input), compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
        ),
        batch_stats=[service_pb2.InferBatchStatistics(
            batch_size=b.batch_size, compute_input=_duration(b.compute_input),
            compute_infer=_duration(b.compute_infer), compute_output=_duration(b.compute_output),
        ) for b in s.batches],
    ) for s in stats])  # fmt: skip


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """GRPCInferenceService over the data plane."""

    def __init__(self, services: Services, access: AccessControl) -> None:
        self.services = services
        self.dataplane = services.dataplane
        self.access = access

    def _allow(self, context: grpc.aio.ServicerContext, action: Action, model: str | None = None) -> None:
        metadata = dict(context.invocation_metadata() or ())
        authorization = metadata.get("authorization")
        peer = context.peer() or "unknown"  # "ipv4:127.0.0.1:54321": the address without the port
        caller = peer.rsplit(":", 1)[0]
        self.access.check(authorization if isinstance(authorization, str) else None, caller, action, model)

    async def _call(
        self, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]], action: Action, model: str | None
    ) -> T:
        try:
            self._allow(context, action, model)
            return await fn()
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # every error becomes a status; public_error logs the unexpected ones
            kind, message = public_error(exc, f"gRPC {action} {model or ''}".rstrip())
            await context.abort(GRPC_STATUS[kind], message)
        raise AssertionError("context.abort returns only by raising")

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC method names)
        async def run() -> Any:
            return service_pb2.ServerLiveResponse(live=self.dataplane.live())

        return await self._call(context, run, "health", None)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            return service_pb2.ServerReadyResponse(ready=await self.services.wide.ready())

        return await self._call(context, run, "health", None)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            meta = self.dataplane.server_metadata()
            return service_pb2.ServerMetadataResponse(name=meta.name, version=meta.version, extensions=meta.extensions)

        return await self._call(context, run, "metadata", None)

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            return service_pb2.ModelReadyResponse(
                ready=await self.services.wide.model_ready(request.name, request.version or None)
            )

        return await self._call(context, run, "read", request.name)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            meta = self.dataplane.model_metadata(request.name, request.version or None)
            return service_pb2.ModelMetadataResponse(
                name=meta.name,
                versions=meta.versions,
                platform=meta.platform,
                inputs=[_tensor_metadata(t) for t in meta.inputs],
                outputs=[_tensor_metadata(t) for t in meta.outputs],
            )

        return await self._call(context, run, "read", request.name)

    async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            config = self.dataplane.model_config(request.name, request.version or None)
            return service_pb2.ModelConfigResponse(config=encode_config(config))

        return await self._call(context, run, "read", request.name)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            return encode_statistics(await self.services.wide.statistics(request.name or None, request.version or None))

        return await self._call(context, run, "read" if request.name else "index", request.name or None)

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            return service_pb2.RepositoryIndexResponse(models=[
                service_pb2.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state,
                                                               reason=e.reason)
                for e in self.services.management.index()
            ])  # fmt: skip

        return await self._call(context, run, "index", None)

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            await self.services.wide.load(request.model_name, _parameters(request.parameters))
            return service_pb2.RepositoryModelLoadResponse()

        return await self._call(context, run, "admin", None)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            await self.services.wide.unload(request.model_name, _parameters(request.parameters))
            return service_pb2.RepositoryModelUnloadResponse()

        return await self._call(context, run, "admin", None)

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def run() -> Any:
            response = await self.dataplane.infer(
                request.model_name, request.model_version or None, decode_infer(request)
            )
            return encode_infer(response)

        return await self._call(context, run, "infer", request.model_name)

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        # Errors go into the stream (Triton's ModelStreamInferResponse.error_message), which keeps it open.
        async for request in request_iterator:
            try:
                self._allow(context, "infer", request.model_name)
                name = request.model_name
                version = self.dataplane.draw(name, request.model_version or None)  # one version decides both
                if self.services.generation.generates(name, version):
                    async for message in self._generation(name, version, decode_infer(request)):
                        yield message
                    continue
                response = await self.dataplane.infer(name, version, decode_infer(request))
                yield service_pb2.ModelStreamInferResponse(infer_response=encode_infer(response))
            except Exception as exc:  # public_error logs the unexpected ones
                _, message = public_error(exc, f"gRPC stream {request.model_name}")
                yield service_pb2.ModelStreamInferResponse(error_message=message)

    async def _generation(self, name: str, version: str | None, request: InferRequest) -> AsyncIterator[Any]:
        """A language model's answer as decoupled responses: one per piece of text, the last marked final
        (or an empty final one, when the client asked with triton_enable_empty_final_response)."""
        generation = await self.services.generation.start(name, version, request)
        empty_final = bool(request.parameters.get("triton_enable_empty_final_response", False))
        held: str | None = None  # one piece behind, so the last one can carry the final flag
        async for piece in self.services.generation.stream(generation):
            if held is not None:
                yield _piece(generation, request, held, final=False)
            held = piece
        if held is not None:
            yield _piece(generation, request, held, final=not empty_final)
        if held is None or empty_final:
            yield _piece(generation, request, None, final=True)


def _piece(generation: Generation, request: InferRequest, text: str | None, final: bool) -> Any:
    response = service_pb2.ModelInferResponse(
        model_name=generation.decoder.name, model_version=generation.decoder.version, id=request.id or ""
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


_SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]


@dataclass(frozen=True)
class Method:
    """One RPC of the service: its handler with requests parsed leniently (None when malformed)."""

    behaviour: Callable[[Any, Any], Any]  # (request or request iterator, context) -> response or response iterator
    parse: Callable[[bytes], Any]
    serialize: Callable[[Any], bytes]
    streaming: bool


def methods(services: Services, access: AccessControl) -> dict[str, Method]:
    """Every method of the service by its path ("/inference.GRPCInferenceService/ModelInfer"), from its
    descriptor: what grpc.aio registers and what the native front end (grpc_native.py) dispatches to."""
    servicer = InferenceServicer(services, access)
    table = {}
    for method in _SERVICE.methods:
        request_class = getattr(service_pb2, method.input_type.name)
        response_class = getattr(service_pb2, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        wrapped = _streaming(behaviour) if method.client_streaming else _unary(behaviour)
        table[f"/{_SERVICE.full_name}/{method.name}"] = Method(
            wrapped, _lenient(request_class), response_class.SerializeToString, method.client_streaming
        )
    return table


def add_servicer(server: grpc.aio.Server, services: Services, access: AccessControl) -> None:
    """Register every method of the service on a grpc.aio server."""
    handlers = {}
    for path, method in methods(services, access).items():
        kind = grpc.stream_stream_rpc_method_handler if method.streaming else grpc.unary_unary_rpc_method_handler
        handlers[path.rsplit("/", 1)[1]] = kind(method.behaviour, method.parse, method.serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE.full_name, handlers),))
