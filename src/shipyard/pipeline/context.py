"""What the pipeline steps share: the spec, the source model, the data, and what they produced."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shipyard.artifact.manifest import GenerationRecord, LineageStep
from shipyard.spec.loader import LoadedSpec
from shipyard.spec.models import ConvertSpec, SignatureSpec
from shipyard.tokenizer import TextEncoder


@dataclass(frozen=True)
class ExportResult:
    """An ONNX file produced from a source model, and how it was made."""

    path: Path
    params: dict[str, Any]


class SourceModel(Protocol):
    """A loaded original model: runnable in its own framework and convertible to ONNX."""

    framework: str

    def predict(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in signature order for one batch of named inputs."""
        ...

    def export_onnx(self, dest: Path, signature: SignatureSpec, convert: ConvertSpec) -> ExportResult:
        """Write an ONNX graph with the signature's input names to `dest`."""
        ...


@dataclass(frozen=True)
class EvalData:
    """Evaluation inputs (sample-major, conformed to the signature) and targets."""

    inputs: dict[str, np.ndarray]
    target: np.ndarray

    def __len__(self) -> int:
        return len(self.target)

    def head(self, n: int) -> dict[str, np.ndarray]:
        return {k: v[:n] for k, v in self.inputs.items()}


@dataclass
class BuildContext:
    """Mutable state passed from step to step during one build."""

    loaded: LoadedSpec
    artifact_dir: Path  # becomes the version folder: only artifact files go here
    scratch_dir: Path  # temporary files, discarded after the build
    source_sha256: str | None = None
    source: SourceModel | None = None
    signature: SignatureSpec | None = None
    eval_data: EvalData | None = None
    text: TextEncoder | None = None  # text models: the tokenizer in front of the graph
    generation: GenerationRecord | None = None  # language models: served token by token
    model_path: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    lineage: list[LineageStep] = field(default_factory=list)

    @property
    def base_dir(self) -> Path:
        return self.loaded.base_dir

    def require_model(self) -> tuple[Path, SignatureSpec]:
        if self.model_path is None or self.signature is None:
            raise RuntimeError("pipeline order: the convert step must run before this one")
        return self.model_path, self.signature
