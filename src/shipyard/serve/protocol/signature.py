"""A loaded model's signature, precomputed for per-request validation (no work repeated per request)."""

from __future__ import annotations

from dataclasses import dataclass

from shipyard.dtypes import BY_NAME
from shipyard.serve.protocol.types import TensorMetadata
from shipyard.spec.models import SignatureSpec, TensorSpec


@dataclass(frozen=True)
class TensorSchema:
    name: str
    datatype: str  # V2 datatype
    shape: list[int]  # V2 shape: -1 for dynamic dimensions
    text: bool  # an ONNX string tensor (fed to onnxruntime as str)

    @classmethod
    def of(cls, tensor: TensorSpec) -> TensorSchema:
        shape = [d if isinstance(d, int) else -1 for d in tensor.shape]
        return cls(tensor.name, BY_NAME[tensor.dtype].v2, shape, tensor.dtype == "string")

    def metadata(self) -> TensorMetadata:
        return TensorMetadata(self.name, self.datatype, self.shape)


@dataclass(frozen=True)
class ModelSchema:
    inputs: dict[str, TensorSchema]
    outputs: dict[str, TensorSchema]
    output_order: list[str]

    @classmethod
    def of(cls, signature: SignatureSpec) -> ModelSchema:
        return cls(
            inputs={t.name: TensorSchema.of(t) for t in signature.inputs},
            outputs={t.name: TensorSchema.of(t) for t in signature.outputs},
            output_order=[t.name for t in signature.outputs],
        )
