"""V2 REST bodies ↔ domain types: JSON tensors, the binary tensor data extension, and the JSON form of
metadata, configuration, statistics and the repository index."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from shipyard.errors import InvalidInputError
from shipyard.serve.protocol.tensors import from_list, from_raw, to_list, to_raw
from shipyard.serve.protocol.types import (
    ConfigTensor,
    Duration,
    InferRequest,
    InferResponse,
    ModelConfig,
    ModelMetadata,
    ModelStatistics,
    RepositoryEntry,
    RequestedOutput,
    ServerMetadata,
    Tensor,
    TensorMetadata,
)

HEADER_LENGTH = "inference-header-content-length"


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a JSON object")
    return value


def _shape(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InvalidInputError(f"input {name!r}: shape must be a list of integers")
    if any(d < 0 for d in value):
        raise InvalidInputError(f"input {name!r}: shape {value} has a negative dimension")
    return value


def decode_request(body: bytes, header_length: int | None) -> InferRequest:
    """Parse a V2 infer body; with a header length, the bytes after the JSON hold binary tensors."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise InvalidInputError(
                f"Inference-Header-Content-Length {header_length} does not fit a body of {len(body)} bytes"
            )
        json_part, binary = memoryview(body)[:header_length], memoryview(body)[header_length:]
    else:
        json_part, binary = memoryview(body), memoryview(b"")
    try:
        payload = _dict(orjson.loads(json_part), "the request body")
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError(f"malformed JSON: {exc}") from None
    raw_inputs = payload.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInputError("'inputs' must be a non-empty list")
    inputs, offset = [], 0
    for raw in raw_inputs:
        item = _dict(raw, "each input")
        name, datatype = item.get("name"), item.get("datatype")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidInputError("each input needs a string 'name' and 'datatype'")
        shape = _shape(item.get("shape"), name)
        params = _dict(item.get("parameters") or {}, f"input {name!r} parameters")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInputError(f"input {name!r}: binary_data_size {size} exceeds the binary data sent")
            data = from_raw(datatype, shape, binary[offset : offset + size])
            offset += size
        elif "data" in item:
            data = from_list(datatype, shape, item["data"])
        else:
            raise InvalidInputError(f"input {name!r} has neither 'data' nor binary_data_size")
        inputs.append(Tensor(name, datatype, shape, data, params))
    if offset != len(binary):
        raise InvalidInputError(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    outputs = None
    if payload.get("outputs") is not None:
        if not isinstance(payload["outputs"], list):
            raise InvalidInputError("'outputs' must be a list")
        outputs = []
        for raw in payload["outputs"]:
            out = _dict(raw, "each requested output")
            if not isinstance(out.get("name"), str):
                raise InvalidInputError("each requested output needs a string 'name'")
            outputs.append(RequestedOutput(out["name"], _dict(out.get("parameters") or {}, "output parameters")))
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInputError("'id' must be a string")
    return InferRequest(inputs, outputs, request_id, _dict(payload.get("parameters") or {}, "parameters"))


def decode_object(body: bytes) -> dict[str, Any]:
    """A JSON object body (empty: {}); InvalidInputError for anything else."""
    if not body.strip():
        return {}
    try:
        return _dict(orjson.loads(body), "the request body")
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError(f"malformed JSON: {exc}") from None


def decode_parameters(body: bytes) -> dict[str, Any]:
    """The optional `{"parameters": {...}}` body of repository load/unload requests."""
    return _dict(decode_object(body).get("parameters") or {}, "parameters")


_GENERATE_PARAMETERS = ("max_tokens", "temperature", "top_p", "seed", "stop")  # what the README lists


def decode_generate(body: bytes) -> InferRequest:
    """A generate-extension body: {"text_input": str, "parameters": {...}}; top-level max_tokens,
    temperature, top_p, seed and stop are taken as parameters too (as Triton's generate endpoint maps them)."""
    fields = decode_object(body)
    text = fields.pop("text_input", None)
    if not isinstance(text, str):
        raise InvalidInputError('the body needs "text_input": a string')
    request_id = fields.pop("id", None)
    parameters = _dict(fields.pop("parameters", None) or {}, "parameters")
    unknown = [key for key in fields if key not in _GENERATE_PARAMETERS]
    if unknown:
        raise InvalidInputError(f"unknown fields {unknown}; the body takes text_input, parameters, id, "
                                f"{', '.join(_GENERATE_PARAMETERS)}")  # fmt: skip
    tensor = Tensor("text_input", "BYTES", [1], np.array([text.encode()], dtype=object))
    return InferRequest([tensor], None, request_id if isinstance(request_id, str) else None, {**parameters, **fields})


def _numpy_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError


def encode_response(response: InferResponse, request: InferRequest) -> tuple[bytes, int | None]:
    """The response body, and the JSON header length when binary tensors follow it (else None)."""
    binary_default = bool(request.parameters.get("binary_data_output", False))
    blobs: list[bytes] = []
    outputs = []
    for out in response.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if out.parameters.get("binary_data", binary_default):
            blob = to_raw(out.datatype, out.data)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif out.datatype in ("BYTES", "FP16"):
            entry["data"] = to_list(out.datatype, out.data)
        else:
            entry["data"] = np.ascontiguousarray(out.data).reshape(-1)
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        body["id"] = response.id
    body["outputs"] = outputs
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY, default=_numpy_default)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def encode_json(value: Any) -> bytes:
    return orjson.dumps(value)


# --- domain objects → the protocol's JSON ------------------------------------------------------


def server_metadata(meta: ServerMetadata) -> dict[str, Any]:
    return {"name": meta.name, "version": meta.version, "extensions": meta.extensions}


def _tensor(t: TensorMetadata) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.datatype, "shape": t.shape}


def model_metadata(meta: ModelMetadata) -> dict[str, Any]:
    return {"name": meta.name, "versions": meta.versions, "platform": meta.platform,
            "inputs": [_tensor(t) for t in meta.inputs], "outputs": [_tensor(t) for t in meta.outputs]}  # fmt: skip


def model_config(config: ModelConfig) -> dict[str, Any]:
    """Triton's model configuration in its JSON form (field names as in model_config.proto)."""

    def tensors(items: list[ConfigTensor]) -> list[dict[str, Any]]:
        return [{"name": t.name, "data_type": t.data_type, "dims": t.dims} for t in items]

    body: dict[str, Any] = {
        "name": config.name,
        "platform": config.platform,
        "backend": config.backend,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": config.max_batch_size,
        "input": tensors(config.inputs),
        "output": tensors(config.outputs),
        "instance_group": [{"name": config.name, "kind": "KIND_CPU", "count": config.instances}],
    }
    if config.dynamic_batching:
        body["dynamic_batching"] = {"preferred_batch_size": config.preferred_batch_sizes,
                                    "max_queue_delay_microseconds": config.max_queue_delay_us}  # fmt: skip
    return body


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def statistics(stats: list[ModelStatistics]) -> dict[str, Any]:
    """Triton's statistics extension (JSON field names as in its HTTP API)."""
    zero = {"count": 0, "ns": 0}
    return {"model_stats": [{
        "name": s.name,
        "version": s.version,
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": _duration(s.success), "fail": _duration(s.fail), "queue": _duration(s.queue),
            "compute_input": _duration(s.compute_input), "compute_infer": _duration(s.compute_infer),
            "compute_output": _duration(s.compute_output), "cache_hit": zero, "cache_miss": zero,
        },
        "batch_stats": [{"batch_size": b.batch_size, "compute_input": _duration(b.compute_input),
                         "compute_infer": _duration(b.compute_infer), "compute_output": _duration(b.compute_output)}
                        for b in s.batches],
    } for s in stats]}  # fmt: skip


def repository_index(entries: list[RepositoryEntry]) -> list[dict[str, str]]:
    return [{"name": e.name, "version": e.version, "state": e.state, "reason": e.reason} for e in entries]
