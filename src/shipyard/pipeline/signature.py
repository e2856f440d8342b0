"""The spec's declared signature against a graph's: a declared tensor must be what the model has."""

from __future__ import annotations

from typing import Any

import numpy as np

from shipyard.errors import SpecError
from shipyard.spec.models import SignatureSpec


def check_declared(declared: SignatureSpec, graph: SignatureSpec, what: str = "the converted graph") -> None:
    """SpecError naming the tensor, what was declared and what `what` has, when a declared tensor is not there,
    has another dtype or rank, or a fixed dimension of another size."""
    for kind, wanted, have in (("input", declared.inputs, graph.inputs), ("output", declared.outputs, graph.outputs)):
        found = {t.name: t for t in have}
        for tensor in wanted:
            where = f"model.signature: {kind} {tensor.name!r}"
            actual = found.get(tensor.name)
            if actual is None:
                raise SpecError(f"{where} is not an {kind} of {what} (its {kind}s: {', '.join(found)})")
            if actual.dtype != tensor.dtype:
                raise SpecError(f"{where} is declared {tensor.dtype}, {what}'s is {actual.dtype}")
            if len(actual.shape) != len(tensor.shape):
                raise SpecError(f"{where} is declared {tensor.shape}, {what}'s is {actual.shape}")
            for axis, (want, got) in enumerate(zip(tensor.shape, actual.shape, strict=True)):
                if isinstance(want, int) and isinstance(got, int) and want != got:
                    raise SpecError(f"{where}: dimension {axis} is declared {want}, {what}'s is {got} "
                                    f"(its shape: {actual.shape})")  # fmt: skip


def check_produced(signature: SignatureSpec, outputs: list[np.ndarray]) -> None:
    """SpecError when an output the graph leaves dynamic comes out with another size than a fixed one declared."""
    for tensor, array in zip(signature.outputs, outputs, strict=True):
        for axis, want in enumerate(tensor.shape[1:], start=1):
            if isinstance(want, int) and (array.ndim <= axis or array.shape[axis] != want):
                raise SpecError(f"model.signature: output {tensor.name!r}: dimension {axis} is declared {want}, "
                                f"the converted model returns shape {list(array.shape)}")  # fmt: skip


def merge_signature(declared: SignatureSpec, graph: SignatureSpec) -> SignatureSpec:
    """The graph's signature, keeping the declared dimensions where the ranks agree (a declared size of a
    dimension the graph leaves dynamic is then checked against what the model returns)."""

    def pick(graph_tensors: list[Any], declared_tensors: list[Any]) -> list[Any]:
        named = {t.name: t for t in declared_tensors}
        return [
            t.model_copy(update={"shape": named[t.name].shape})
            if t.name in named and len(named[t.name].shape) == len(t.shape)
            else t
            for t in graph_tensors
        ]

    return SignatureSpec(inputs=pick(graph.inputs, declared.inputs), outputs=pick(graph.outputs, declared.outputs))
