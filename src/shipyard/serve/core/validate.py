"""A request checked against the signature of the version that will answer it, before anything is queued."""

from __future__ import annotations

import numpy as np

from shipyard.errors import InvalidInputError, TooLargeError
from shipyard.serve.core.loaded import LoadedModel
from shipyard.serve.protocol.signature import TensorSchema
from shipyard.serve.protocol.types import InferRequest


def _check_input(tensor: TensorSchema, datatype: str, shape: list[int]) -> None:
    if datatype != tensor.datatype:
        raise InvalidInputError(f"input {tensor.name!r}: datatype {datatype}, the model expects {tensor.datatype}")
    if len(shape) != len(tensor.shape):
        raise InvalidInputError(f"input {tensor.name!r}: shape {shape} does not have the rank of {tensor.shape}")
    for got, want in zip(shape, tensor.shape, strict=True):
        if want != -1 and got != want:
            raise InvalidInputError(f"input {tensor.name!r}: shape {shape} does not match {tensor.shape}")


def check_outputs(handle: LoadedModel, request: InferRequest) -> None:
    """Every requested output exists."""
    names = handle.schema.outputs
    for wanted in request.outputs or ():
        if wanted.name not in names:
            raise InvalidInputError(f"unknown output {wanted.name!r}; the model has {', '.join(sorted(names))}")


def feeds_of(handle: LoadedModel, request: InferRequest, max_elements: int | None) -> tuple[dict[str, np.ndarray], int]:
    """The request's inputs by name, checked (names, datatypes, shapes, sizes), and its batch size."""
    expected = handle.schema.inputs
    feeds: dict[str, np.ndarray] = {}
    for item in request.inputs:
        tensor = expected.get(item.name)
        if tensor is None:
            raise InvalidInputError(f"unexpected input {item.name!r}; the model takes {', '.join(expected)}")
        if item.name in feeds:
            raise InvalidInputError(f"input {item.name!r} given twice")
        _check_input(tensor, item.datatype, item.shape)
        if max_elements is not None and item.data.size > max_elements:
            raise TooLargeError(f"input {item.name!r} has {item.data.size} elements; the limit is {max_elements}")
        feeds[item.name] = item.data
    if len(feeds) != len(expected):
        raise InvalidInputError(f"missing inputs: {', '.join(n for n in expected if n not in feeds)}")
    if not handle.batchable:
        return feeds, 1
    sizes = {a.shape[0] for a in feeds.values()}
    if len(sizes) != 1:
        raise InvalidInputError(f"inputs disagree on the batch dimension: {sorted(sizes)}")
    return feeds, sizes.pop()
