"""Live input and prediction drift against the build's reference.json, over a sliding window of samples.

A sampled share of requests is binned with the reference's decile edges into ring buffers; PSI per input
feature and for the predictions is computed when Prometheus scrapes or the drift endpoint is read, so
the request path only pays for a few `np.digitize` calls on the sampled requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shipyard.artifact.reference import features, prediction, psi


class DriftMonitor:
    def __init__(self, reference: dict[str, Any], output_index: int, window: int = 1000) -> None:
        self.reference = reference
        self.output_index = output_index
        self.window = window
        self._edges = {name: [np.asarray(b["edges"]) for b in bins] for name, bins in reference["inputs"].items()}
        self._inputs = {name: np.zeros((window, len(bins)), np.int16) for name, bins in self._edges.items()}
        self._pred = np.zeros(window, np.int32)
        self._pred_edges = np.asarray(reference["prediction"].get("edges", []))
        self._pos = 0
        self.seen = 0

    def observe(self, feeds: dict[str, np.ndarray], outputs: list[np.ndarray]) -> None:
        output = outputs[self.output_index]
        count = min(len(output), self.window)
        rows = (self._pos + np.arange(count)) % self.window
        for name, edges in self._edges.items():
            feats = features(feeds[name]) if name in feeds else None
            if feats is None:
                continue
            for j, edge in enumerate(edges):
                self._inputs[name][rows, j] = np.digitize(feats[-count:, j], edge)
        kind, values = prediction(output)
        self._pred[rows] = values[-count:] if kind == "class" else np.digitize(values[-count:], self._pred_edges)
        self._pos = (self._pos + count) % self.window
        self.seen += count

    def counts(self) -> DriftCounts:
        """The window as bin counts: what the workers of one server add up before PSI is taken."""
        filled = min(self.seen, self.window)
        inputs = {
            name: [np.bincount(ring[:, j], minlength=len(b["fractions"])) for j, b in enumerate(bins)]
            for name, bins in self.reference["inputs"].items()
            for ring in [self._inputs[name][:filled]]
        }
        expected = len(self.reference["prediction"]["fractions"])
        return DriftCounts(filled, inputs, np.bincount(self._pred[:filled], minlength=expected)[:expected])

    def report(self) -> dict[str, Any]:
        return report_of(self.reference, self.counts())


@dataclass
class DriftCounts:
    samples: int
    inputs: dict[str, list[np.ndarray]]  # per input tensor, per feature: samples in each reference bin
    prediction: np.ndarray

    def __add__(self, other: DriftCounts) -> DriftCounts:
        inputs = {name: [a + b for a, b in zip(bins, other.inputs[name], strict=True)]
                  for name, bins in self.inputs.items()}  # fmt: skip
        return DriftCounts(self.samples + other.samples, inputs, self.prediction + other.prediction)


def report_of(reference: dict[str, Any], counts: DriftCounts) -> dict[str, Any]:
    """PSI per input feature and for the predictions over the counted samples."""
    out: dict[str, Any] = {"window_samples": counts.samples, "inputs": {}, "prediction_psi": 0.0}
    if counts.samples == 0:
        return out
    for name, bins in reference["inputs"].items():
        out["inputs"][name] = [psi(b["fractions"], counts.inputs[name][j]) for j, b in enumerate(bins)]
    out["prediction_psi"] = psi(reference["prediction"]["fractions"], counts.prediction)
    return out
