"""Load step: the source model (any supported framework) and the evaluation data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from shipyard.artifact.hashing import sha256_file
from shipyard.errors import ModelLoadError
from shipyard.onnxrt import check_onnx, session, signature_of
from shipyard.pipeline.context import BuildContext, ExportResult, SourceModel
from shipyard.pipeline.datasets import load_dataset
from shipyard.pipeline.signature import check_declared, merge_signature
from shipyard.pipeline.step import Progress
from shipyard.pipeline.text import spec_encoder
from shipyard.spec.models import ConvertSpec, ModelSourceSpec, SignatureSpec, resolve_path


class OnnxSource:
    """An ONNX model used as it is; 'conversion' places it in the artifact."""

    framework = "onnx"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.graph = check_onnx(path)
        session(path)  # ONNX Runtime must accept it before anything else runs (made again when it is run)
        self._session: ort.InferenceSession | None = None

    def predict(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._session is None:
            self._session = session(self.path)
        return list(self._session.run(None, feeds))

    def release(self) -> None:
        """Drop the session (for a big model, a copy of its weights) until the next `predict`."""
        self._session = None

    def export_onnx(self, dest: Path, signature: SignatureSpec, convert: ConvertSpec) -> ExportResult:
        return ExportResult(self.path, {"converter": "none (already ONNX)"})


def release(source: SourceModel | None) -> None:
    """Free what an ONNX source holds between the steps that run it: the converted copy's session and the
    source's would otherwise hold the weights twice."""
    if isinstance(source, OnnxSource):
        source.release()


def open_source(source: ModelSourceSpec, base_dir: Path) -> tuple[SourceModel, SignatureSpec]:
    """Load the source model and the signature it will be converted with."""
    if source.format == "huggingface":  # a folder; text-generation models take pipeline/language.py instead
        from shipyard.pipeline._hf import encoder_source, read_folder

        source_model: SourceModel
        source_model, signature = encoder_source(read_folder(source, base_dir), source.trust_remote_code)
        return source_model, signature
    if source.path is not None and not resolve_path(base_dir, source.path).is_file():
        raise ModelLoadError(f"model file not found: {resolve_path(base_dir, source.path)}")
    if source.format == "onnx":
        assert source.path is not None
        onnx_source = OnnxSource(resolve_path(base_dir, source.path))
        graph_signature = signature_of(onnx_source.graph)
        if source.signature is None:
            return onnx_source, graph_signature
        check_declared(source.signature, graph_signature, what=f"the graph in {source.path}")
        return onnx_source, merge_signature(source.signature, graph_signature)
    if source.format == "sklearn":
        from shipyard.pipeline._sklearn import SklearnSource

        sk_source = SklearnSource(source, base_dir)
        return sk_source, source.signature or sk_source.default_signature()
    from shipyard.pipeline._torch import TorchSource

    assert source.signature is not None  # required for torch by the spec validator
    return TorchSource.load(source, base_dir), source.signature


def load(ctx: BuildContext, progress: Progress) -> dict[str, Any]:
    """The tensor family's load: the source model, its tokenizer (text models) and the evaluation data."""
    spec = ctx.loaded.spec
    ctx.source, ctx.signature = open_source(spec.model, ctx.base_dir)
    params: dict[str, Any] = {"format": spec.model.format}
    tokenizer = spec.model.tokenizer
    if spec.model.format == "huggingface":
        from shipyard.pipeline._hf import read_folder, tokenizer_spec, weights_hash

        folder = read_folder(spec.model, ctx.base_dir)
        ctx.source_sha256 = weights_hash(folder.path)
        tokenizer = tokenizer_spec(folder)
        params.update(path=folder.path.name, task=spec.model.task, architecture=folder.config["model_type"])
    elif spec.model.path is not None:
        path = resolve_path(ctx.base_dir, spec.model.path)
        ctx.source_sha256 = sha256_file(path)
        params["path"] = path.name
    else:
        assert spec.model.weights is not None
        ctx.source_sha256 = sha256_file(resolve_path(ctx.base_dir, spec.model.weights))
        params.update(module=spec.model.module, weights=Path(spec.model.weights).name)
    if tokenizer is not None:
        ctx.text = spec_encoder(tokenizer, ctx.signature, ctx.base_dir, ctx.artifact_dir)
        params["tokenizer"] = {"input": ctx.text.record.input, "feeds": ctx.text.record.feeds}
    if spec.evaluation is not None:
        ctx.eval_data = load_dataset(
            spec.evaluation.dataset, ctx.signature, ctx.base_dir, spec.evaluation.max_samples, ctx.text
        )
        params["dataset"] = spec.evaluation.dataset.model_dump(mode="json")
        params["samples"] = len(ctx.eval_data)
    progress.update(1, 1)
    return params
