from __future__ import annotations

import numpy as np
import pytest

from shipyard.dtypes import BY_V2
from shipyard.errors import InvalidInputError
from shipyard.serve.protocol.tensors import from_list, from_raw, serialize_bytes, to_list, to_raw
from tests._helpers import sample_data


@pytest.mark.parametrize("datatype", sorted(BY_V2))
def test_raw_round_trip(datatype: str) -> None:
    data = sample_data(datatype, (2, 3))
    back = from_raw(datatype, [2, 3], to_raw(datatype, data))
    assert back.shape == (2, 3)
    assert back.tolist() == data.tolist()


@pytest.mark.parametrize("datatype", sorted(set(BY_V2) - {"BYTES"}))
def test_json_round_trip(datatype: str) -> None:
    data = sample_data(datatype, (2, 3))
    assert from_list(datatype, [2, 3], to_list(datatype, data)).tolist() == data.tolist()


def test_bytes_wire_format() -> None:
    data = np.array([b"ab", b""], dtype=np.object_)
    assert serialize_bytes(data) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    assert from_list("BYTES", [2], ["ab", ""]).tolist() == [b"ab", b""]


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "message"),
    [
        ("FP32", [2], b"\x00" * 7, "raw data is 7 bytes, but FP32\\[2\\] needs 8 bytes"),
        ("BYTES", [1], b"\x05\x00\x00\x00ab", "runs past the end"),
        ("BYTES", [2], b"\x01\x00\x00\x00a", "has 1 elements, its shape needs 2"),
        ("BYTES", [1], b"\x01\x00", "ends inside an element length"),
        ("FP33", [1], b"", "unknown datatype 'FP33'"),
        ("FP32", [-1], b"", "negative dimension"),
    ],
)
def test_raw_errors(datatype: str, shape: list[int], raw: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        from_raw(datatype, shape, raw)


def test_json_errors() -> None:
    with pytest.raises(InvalidInputError, match="data has 3 elements, shape \\[2\\] needs 2"):
        from_list("INT32", [2], [1, 2, 3])
    with pytest.raises(InvalidInputError, match="does not fit datatype FP32"):
        from_list("FP32", [1], ["x"])
    with pytest.raises(InvalidInputError, match="BYTES data must be strings"):
        from_list("BYTES", [1], [1])
    with pytest.raises(InvalidInputError, match="does not fit datatype UINT8"):
        from_list("UINT8", [1], [1000])
