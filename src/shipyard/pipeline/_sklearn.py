"""scikit-learn sources: safe .skops files (or trusted pickles), converted with skl2onnx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shipyard._extras import require
from shipyard.errors import ConversionError, ModelLoadError, UnsafeModelError
from shipyard.pipeline._imports import on_sys_path
from shipyard.pipeline._picklescan import refuse_untrusted_globals
from shipyard.pipeline.context import ExportResult
from shipyard.spec.models import ConvertSpec, ModelSourceSpec, SignatureSpec, TensorSpec, resolve_path

# Types from these packages are plain data containers and estimators: safe to reconstruct from
# a .skops file. Anything else must be trusted explicitly.
_TRUSTED_ROOTS = ("sklearn", "numpy", "scipy", "builtins", "collections")
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")


def _load_estimator(path: Path, trust_pickle: bool, base_dir: Path) -> Any:
    if path.suffix == ".skops":
        sio = require("skops.io", "sklearn", "Loading .skops models")
        try:
            untrusted = sio.get_untrusted_types(file=str(path))
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a readable .skops file: {exc}") from None
        unsafe = [t for t in untrusted if t.split(".")[0] not in _TRUSTED_ROOTS]
        if unsafe and not trust_pickle:
            raise UnsafeModelError(
                f"{path} contains types outside scikit-learn/numpy/scipy ({', '.join(unsafe)}); "
                "set `trust_pickle: true` only if you produced this file yourself"
            )
        return sio.load(str(path), trusted=untrusted)
    if path.suffix in _PICKLE_SUFFIXES:
        if not trust_pickle:
            raise UnsafeModelError(
                f"{path} is a pickle: unpickling runs arbitrary code, so it is refused. Save the estimator "
                "with skops (skops.io.dump, a .skops file), or set `trust_pickle: true` if you produced it yourself."
            )
        joblib = require("joblib", "sklearn", "Loading pickled scikit-learn models")
        refuse_untrusted_globals(path, base_dir)
        try:
            with on_sys_path(base_dir):  # the pickle names the user's classes by module path
                return joblib.load(str(path))
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot unpickle: {type(exc).__name__}: {exc}") from None
    raise ModelLoadError(f"{path}: scikit-learn models must be .skops (or a trusted .pkl/.joblib)")


def _final_estimator(estimator: Any) -> Any:
    return estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator


class SklearnSource:
    """A fitted estimator; outputs follow skl2onnx's order: label then probabilities for classifiers."""

    framework = "sklearn"

    def __init__(self, source: ModelSourceSpec, base_dir: Path) -> None:
        assert source.path is not None
        self.estimator = _load_estimator(resolve_path(base_dir, source.path), source.trust_pickle, base_dir)
        if not hasattr(self.estimator, "predict"):
            raise ModelLoadError(f"{source.path}: loaded a {type(self.estimator).__name__}, not an estimator")
        self._classifier = hasattr(_final_estimator(self.estimator), "predict_proba")

    def default_signature(self) -> SignatureSpec:
        features = getattr(self.estimator, "n_features_in_", None)
        if features is None:
            raise ModelLoadError("the estimator is not fitted (no n_features_in_)")
        return SignatureSpec(inputs=[TensorSpec(name="input", dtype="float32", shape=["batch", int(features)])])

    def parameter_count(self) -> int:
        return 0  # counted on the converted graph instead

    def predict(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        (x,) = feeds.values()
        if self._classifier:
            return [self.estimator.predict(x), self.estimator.predict_proba(x)]
        return [np.asarray(self.estimator.predict(x)).reshape(len(x), -1)]

    def export_onnx(self, dest: Path, signature: SignatureSpec, convert: ConvertSpec) -> ExportResult:
        skl2onnx = require("skl2onnx", "sklearn", "Converting scikit-learn models")
        data_types = require("skl2onnx.common.data_types", "sklearn", "Converting scikit-learn models")
        (inp,) = signature.inputs
        types = {"float32": data_types.FloatTensorType, "float64": data_types.DoubleTensorType,
                 "int64": data_types.Int64TensorType}  # fmt: skip
        if inp.dtype not in types:
            raise ConversionError(f"scikit-learn input dtype must be one of {sorted(types)}, not {inp.dtype}")
        shape = [None if isinstance(d, str) else d for d in inp.shape]
        final = _final_estimator(self.estimator)
        options = {id(final): {"zipmap": False}} if self._classifier else None
        try:
            onx = skl2onnx.convert_sklearn(
                self.estimator, initial_types=[(inp.name, types[inp.dtype](shape))],
                target_opset={"": convert.opset, "ai.onnx.ml": 3}, options=options,
            )  # fmt: skip
        except Exception as exc:
            raise ConversionError(f"skl2onnx cannot convert {type(self.estimator).__name__}: {exc}") from None
        dest.write_bytes(onx.SerializeToString())
        return ExportResult(dest, {"converter": "skl2onnx", "opset": convert.opset, "zipmap": False})
