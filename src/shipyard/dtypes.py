"""The one datatype table: each tensor element type as the spec, the Open Inference Protocol, numpy and
ONNX spell it. Everything that converts between those spellings reads this table."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shipyard.errors import InvalidInputError


@dataclass(frozen=True)
class DType:
    name: str  # the spec's spelling (TensorSpec.dtype)
    v2: str  # the Open Inference Protocol's datatype
    numpy: np.dtype[np.generic]  # strings: object arrays
    onnx: int  # onnx.TensorProto.DataType (stable numbers from onnx.proto)


TABLE = (
    DType("bool", "BOOL", np.dtype(np.bool_), 9),
    DType("uint8", "UINT8", np.dtype(np.uint8), 2),
    DType("uint16", "UINT16", np.dtype(np.uint16), 4),
    DType("uint32", "UINT32", np.dtype(np.uint32), 12),
    DType("uint64", "UINT64", np.dtype(np.uint64), 13),
    DType("int8", "INT8", np.dtype(np.int8), 3),
    DType("int16", "INT16", np.dtype(np.int16), 5),
    DType("int32", "INT32", np.dtype(np.int32), 6),
    DType("int64", "INT64", np.dtype(np.int64), 7),
    DType("float16", "FP16", np.dtype(np.float16), 10),
    DType("float32", "FP32", np.dtype(np.float32), 1),
    DType("float64", "FP64", np.dtype(np.float64), 11),
    DType("string", "BYTES", np.dtype(np.object_), 8),
)
BY_NAME = {t.name: t for t in TABLE}
BY_V2 = {t.v2: t for t in TABLE}
BY_ONNX = {t.onnx: t for t in TABLE}


def numpy_of(name: str) -> np.dtype[np.generic]:
    """The numpy dtype of a spec dtype name (`float32`, `string`, …)."""
    return BY_NAME[name].numpy


def numpy_of_v2(datatype: str) -> np.dtype[np.generic]:
    """The numpy dtype of a protocol datatype (`FP32`, `BYTES`, …); InvalidInputError for unknown ones."""
    try:
        return BY_V2[datatype].numpy
    except KeyError:
        raise InvalidInputError(f"unknown datatype {datatype!r}; expected one of {', '.join(BY_V2)}") from None
