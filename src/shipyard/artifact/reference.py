"""The reference distributions a build records (`reference.json`), and the features both sides compute.

At build time the evaluation inputs and the model's predictions on them are summarised as decile bins:
for each numeric input, one feature per element when a sample has at most MAX_FEATURES elements, else
the sample's mean; for the evaluated output, the predicted class when it scores several classes, else its
value. The server bins live traffic the same way and compares with the population stability index
(PSI): below 0.1 is stable, 0.1-0.2 a shift worth a look, above 0.2 a real change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE_FILE = "reference.json"
MAX_FEATURES = 32
BINS = 10
_FLOOR = 1e-4  # empty bins would make PSI infinite


def features(tensor: np.ndarray) -> np.ndarray | None:
    """(samples, features) for a numeric batch tensor; None for text inputs."""
    if tensor.dtype.kind not in "biuf" or tensor.ndim == 0:
        return None
    flat = tensor.reshape(len(tensor), -1).astype(np.float64)
    return flat if flat.shape[1] <= MAX_FEATURES else flat.mean(axis=1, keepdims=True)


def prediction(output: np.ndarray) -> tuple[str, np.ndarray]:
    """("class", argmax) for class scores, else ("value", one number per sample)."""
    flat = output.reshape(len(output), -1)
    if flat.shape[1] > 1 and output.dtype.kind == "f":
        return "class", flat.argmax(axis=1)
    return "value", flat[:, 0].astype(np.float64)


def _bins(values: np.ndarray) -> dict[str, list[float]]:
    edges = np.unique(np.quantile(values, np.linspace(0, 1, BINS + 1)[1:-1]))
    counts = np.bincount(np.digitize(values, edges), minlength=len(edges) + 1)
    return {"edges": edges.tolist(), "fractions": (counts / counts.sum()).tolist()}


def build_reference(inputs: dict[str, np.ndarray], output: np.ndarray, output_name: str) -> dict[str, Any]:
    """The reference.json content for evaluation inputs and the model's output (the evaluated one) on them."""
    ref: dict[str, Any] = {"inputs": {}, "samples": len(output), "output": output_name}
    for name, tensor in inputs.items():
        feats = features(tensor)
        if feats is not None:
            ref["inputs"][name] = [_bins(feats[:, j]) for j in range(feats.shape[1])]
    kind, values = prediction(output)
    if kind == "class":
        classes = int(output.reshape(len(output), -1).shape[1])
        counts = np.bincount(values, minlength=classes)
        ref["prediction"] = {"kind": kind, "fractions": (counts / counts.sum()).tolist()}
    else:
        ref["prediction"] = {"kind": kind, **_bins(values)}
    return ref


def write_reference(folder: Path, reference: dict[str, Any]) -> Path:
    path = folder / REFERENCE_FILE
    path.write_text(json.dumps(reference, indent=1))
    return path


def read_reference(folder: Path) -> dict[str, Any] | None:
    path = folder / REFERENCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def psi(expected: list[float], observed_counts: np.ndarray) -> float:
    """Population stability index of observed bin counts against the expected fractions."""
    total = observed_counts.sum()
    if total == 0:
        return 0.0
    e = np.maximum(np.asarray(expected), _FLOOR)
    o = np.maximum(observed_counts / total, _FLOOR)
    return float(np.sum((o - e) * np.log(o / e)))
