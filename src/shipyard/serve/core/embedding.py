"""Embeddings: texts in, one vector each, through a tensor model that takes one text input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shipyard.errors import InvalidInputError
from shipyard.serve.core.loaded import LanguageModel, LoadedModel, TensorModel
from shipyard.serve.protocol.types import InferRequest, InferResponse, Tensor


@dataclass(frozen=True)
class Embedded:
    """The vectors of a batch of texts, the version that made them, and the tokens it read."""

    model_version: str
    vectors: np.ndarray  # [texts, size] float32
    tokens: int


def embedding_model(model: LoadedModel) -> TensorModel:
    """The model, if it embeds text (one text input, at least one output); else a 400 saying what it is."""
    if isinstance(model, LanguageModel):
        raise InvalidInputError(f"model {model.name!r} is a language model: use /v1/completions", param="model")
    inputs = list(model.schema.inputs.values())
    if not isinstance(model, TensorModel) or len(inputs) != 1 or not inputs[0].text or not model.schema.outputs:
        raise InvalidInputError(f"model {model.name!r} does not take one text input: it is not an embedding model",
                                param="model")  # fmt: skip
    return model


def request_of(model: TensorModel, texts: list[str]) -> InferRequest:
    """The texts as the model's one input: a batch of one-element rows."""
    tensor = next(iter(model.schema.inputs.values()))
    shape = [len(texts), *([1] * (len(tensor.shape) - 1))]
    data = np.array([t.encode() for t in texts], dtype=object).reshape(shape)
    return InferRequest([Tensor(tensor.name, "BYTES", shape, data)])


def embedded(model: TensorModel, texts: list[str], response: InferResponse, dimensions: int | None) -> Embedded:
    """The answer's first output as one vector per text: cut to `dimensions` (one of the sizes the spec declares
    the model was trained for) and L2-normalised again, and the tokens its tokenizer counts."""
    vectors = np.asarray(response.outputs[0].data, dtype=np.float32).reshape(len(texts), -1)
    if dimensions is not None:
        allowed = ((model.manifest.spec or {}).get("model") or {}).get("dimensions") or []
        if dimensions not in allowed:
            sizes = f"the sizes it was trained for: {', '.join(map(str, allowed))}" if allowed else "one size"
            raise InvalidInputError(f"'dimensions' {dimensions} is not one of this model's embedding sizes ({sizes})",
                                    param="dimensions")  # fmt: skip
        cut = vectors[:, :dimensions]
        vectors = cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)
    encoder = model.runtime.text_encoder
    return Embedded(response.model_version, vectors, encoder.count(texts) if encoder is not None else 0)
