"""Datasets for evaluation and training: .npz files, scikit-learn bundled sets, or a user function."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from shipyard._extras import require
from shipyard.dtypes import numpy_of
from shipyard.errors import EvaluationError, SpecError
from shipyard.pipeline._imports import import_object
from shipyard.pipeline.context import EvalData
from shipyard.spec.models import (
    DatasetSpec,
    FunctionDatasetSpec,
    NpzDatasetSpec,
    ShipyardSpec,
    SignatureSpec,
    SklearnDatasetSpec,
    TensorSpec,
    TextDatasetSpec,
    resolve_path,
)
from shipyard.tokenizer import TextEncoder, load_tokenizer

_CLASSIFICATION_SETS = {"digits", "iris", "wine", "breast_cancer"}


def sklearn_split(spec: SklearnDatasetSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test) exactly as the spec defines the split; training scripts reuse it."""
    datasets = require("sklearn.datasets", "sklearn", "scikit-learn bundled datasets")
    selection = require("sklearn.model_selection", "sklearn", "scikit-learn bundled datasets")
    x, y = getattr(datasets, f"load_{spec.name}")(return_X_y=True)
    stratify = y if spec.name in _CLASSIFICATION_SETS else None
    parts = selection.train_test_split(x, y, test_size=spec.test_size, random_state=spec.seed, stratify=stratify)
    return tuple(parts)


def _sklearn(spec: SklearnDatasetSpec) -> tuple[Any, np.ndarray]:
    x_train, x_test, y_train, y_test = sklearn_split(spec)
    if spec.split == "train":
        return x_train, y_train
    if spec.split == "test":
        return x_test, y_test
    return np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])


def _npz(spec: NpzDatasetSpec, signature: SignatureSpec, base_dir: Path) -> tuple[Any, np.ndarray]:
    path = resolve_path(base_dir, spec.path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise EvaluationError(f"dataset file not found: {path}") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise EvaluationError(f"{path}: not a readable .npz file (object arrays are refused): {exc}") from None
    names = [t.name for t in signature.inputs]
    mapping = spec.inputs or ({names[0]: "x"} if len(names) == 1 else {n: n for n in names})
    missing = [key for key in [*mapping.values(), spec.target] if key not in arrays]
    if missing:
        raise EvaluationError(
            f"{path}: no array named {', '.join(missing)} (has {', '.join(sorted(arrays))}); name the arrays in the "
            "dataset spec: `inputs: {INPUT: KEY}` for the model's inputs, `target: KEY` for the labels "
            "(defaults: x for a single-input model, else the input names; y)"
        )
    return {name: arrays[key] for name, key in mapping.items()}, arrays[spec.target]


def _function(spec: FunctionDatasetSpec, base_dir: Path) -> tuple[Any, np.ndarray]:
    func = import_object(spec.ref, base_dir)
    try:
        result = func()
    except Exception as exc:
        raise EvaluationError(f"dataset function {spec.ref} raised {type(exc).__name__}: {exc}") from None
    if not (isinstance(result, tuple) and len(result) == 2):
        raise EvaluationError(f"dataset function {spec.ref} must return (inputs, targets)")
    return result[0], np.asarray(result[1])


def _conform(tensor: TensorSpec, array: Any, samples: int) -> np.ndarray:
    """Cast to the signature dtype and reshape flat samples to the tensor's static sample shape."""
    data = np.asarray(array)
    if len(data) != samples:
        raise EvaluationError(f"input {tensor.name!r} has {len(data)} samples, targets have {samples}")
    sample_shape = tensor.shape[1:]
    if all(isinstance(d, int) for d in sample_shape) and data.shape[1:] != tuple(sample_shape):
        if int(np.prod(data.shape[1:])) != int(np.prod(sample_shape)):  # type: ignore[arg-type]
            raise EvaluationError(
                f"input {tensor.name!r}: samples of shape {list(data.shape[1:])} cannot become {sample_shape}"
            )
        data = data.reshape(len(data), *sample_shape)
    try:
        return data.astype(numpy_of(tensor.dtype), copy=False)
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"input {tensor.name!r}: cannot cast {data.dtype} to {tensor.dtype}: {exc}") from None


def load_dataset(
    ds: DatasetSpec,
    signature: SignatureSpec,
    base_dir: Path,
    max_samples: int | None = None,
    text: TextEncoder | None = None,
) -> EvalData:
    """Load a dataset (the first `max_samples`) conformed to the model signature; EvaluationError on any mismatch.

    With a text encoder the dataset gives strings (the served signature) and they are tokenized for the graph.
    """
    if text is not None:
        signature = text.record.served(signature)
    if isinstance(ds, SklearnDatasetSpec):
        raw_inputs, target = _sklearn(ds)
    elif isinstance(ds, NpzDatasetSpec):
        raw_inputs, target = _npz(ds, signature, base_dir)
    elif isinstance(ds, FunctionDatasetSpec):
        raw_inputs, target = _function(ds, base_dir)
    else:  # the spec allows text datasets for language models only, which pipeline/language.py reads
        raise EvaluationError("a `kind: text` dataset is for language models (task: text-generation)")
    if not isinstance(raw_inputs, dict):
        if len(signature.inputs) != 1:
            raise EvaluationError(f"the model has {len(signature.inputs)} inputs: the dataset must name each")
        raw_inputs = {signature.inputs[0].name: raw_inputs}
    unknown = set(raw_inputs) - {t.name for t in signature.inputs}
    if unknown:
        raise EvaluationError(f"dataset inputs {sorted(unknown)} are not model inputs")
    target = np.asarray(target)
    if len(target) == 0:
        raise EvaluationError("the evaluation set is empty")
    inputs = {t.name: _conform(t, raw_inputs[t.name], len(target)) for t in signature.inputs if t.name in raw_inputs}
    missing = [t.name for t in signature.inputs if t.name not in inputs]
    if missing:
        raise EvaluationError(f"dataset provides no data for inputs {missing}")
    if max_samples is not None and len(target) > max_samples:
        inputs, target = {k: v[:max_samples] for k, v in inputs.items()}, target[:max_samples]
    return EvalData(inputs=inputs if text is None else text.apply(inputs), target=target)


def text_windows(spec: ShipyardSpec, vocab: int, tokenizer_file: Path, base_dir: Path, context: int) -> np.ndarray:
    """A language model's held-out token windows [n, width] from the evaluation's text file; without one, a
    fixed random draw (verification only)."""
    dataset = spec.evaluation.dataset if spec.evaluation is not None else None
    if not isinstance(dataset, TextDatasetSpec):
        return np.random.default_rng(0).integers(0, vocab, (4, min(64, context)))
    path = resolve_path(base_dir, dataset.path)
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"evaluation.dataset: cannot read {path} as UTF-8 text: {exc}") from None
    tokenizer = load_tokenizer(tokenizer_file)
    ids = [i for line in lines for i in tokenizer.encode(line + "\n", add_special_tokens=False).ids]
    width = min(dataset.window, context)
    count = len(ids) // width
    if count < 2:
        raise SpecError(f"evaluation.dataset: {path} has {len(ids)} tokens, fewer than two windows of {width}")
    limit = spec.evaluation.max_samples if spec.evaluation is not None else None
    return np.asarray(ids[: count * width]).reshape(count, width)[:limit]
