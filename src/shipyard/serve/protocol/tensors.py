"""Open Inference Protocol tensors: numpy arrays from and to raw bytes, JSON lists and the BYTES wire format
(the datatype table itself is shipyard.dtypes)."""

from __future__ import annotations

import struct

import numpy as np

from shipyard.dtypes import numpy_of_v2
from shipyard.errors import InvalidInputError

_LENGTH = struct.Struct("<I")


def element_count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        if dim < 0:
            raise InvalidInputError(f"shape {shape} has a negative dimension")
        count *= dim
    return count


def serialize_bytes(array: np.ndarray) -> bytes:
    """BYTES tensor → concatenated (4-byte little-endian length, bytes) elements, row-major."""
    parts = []
    for item in array.reshape(-1):
        raw = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def deserialize_bytes(buffer: bytes | memoryview, count: int) -> np.ndarray:
    """The inverse of serialize_bytes; InvalidInputError if the buffer is not exactly `count` elements."""
    view = memoryview(buffer)
    items: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise InvalidInputError("BYTES tensor data ends inside an element length")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidInputError("BYTES tensor element runs past the end of its data")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidInputError(f"BYTES tensor has {len(items)} elements, its shape needs {count}")
    result = np.empty(count, dtype=np.object_)
    result[:] = items
    return result


def from_raw(datatype: str, shape: list[int], raw: bytes | memoryview) -> np.ndarray:
    """A tensor from its raw little-endian bytes (binary extension / gRPC raw contents)."""
    count = element_count(shape)
    if datatype == "BYTES":
        return deserialize_bytes(raw, count).reshape(shape)
    dtype = numpy_of_v2(datatype)
    if len(raw) != count * dtype.itemsize:
        raise InvalidInputError(
            f"raw data is {len(raw)} bytes, but {datatype}{shape} needs {count * dtype.itemsize} bytes"
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)


def to_raw(datatype: str, array: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes(array)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def from_list(datatype: str, shape: list[int], data: object) -> np.ndarray:
    """A tensor from JSON data (flat or nested lists, row-major)."""
    count = element_count(shape)
    dtype = numpy_of_v2(datatype)
    try:
        if datatype == "BYTES":
            flat = np.asarray(data, dtype=np.object_).reshape(-1)
            array = np.empty(flat.size, dtype=np.object_)
            array[:] = [x.encode() if isinstance(x, str) else x for x in flat]
            if not all(isinstance(x, bytes) for x in array):
                raise InvalidInputError("BYTES data must be strings")
        else:
            array = np.asarray(data, dtype=dtype).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(f"data does not fit datatype {datatype}: {exc}") from None
    if array.size != count:
        raise InvalidInputError(f"data has {array.size} elements, shape {shape} needs {count}")
    return array.reshape(shape)


def to_list(datatype: str, array: np.ndarray) -> list[object]:
    """A flat JSON-ready list (BYTES as UTF-8 strings where possible)."""
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in flat]
    return list(flat.tolist())
