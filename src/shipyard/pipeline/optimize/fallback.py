"""Which nodes to keep in float when a quantized candidate loses too much: rank them by the harm they do.

Each quantizable node is quantized alone and the model's output error against the float model is
measured on calibration inputs; the worst nodes fall back to float first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from shipyard.onnxrt import remove_model, session
from shipyard.pipeline.optimize.transforms import TRANSFORMS, Calibration

_QUANTIZABLE = ("MatMul", "Gemm", "Conv")
_PROBE_SAMPLES = 64


def quantizable_nodes(source: Path) -> list[str]:
    """Named MatMul/Gemm/Conv nodes whose weight is an initializer (what the quantizers touch)."""
    model = onnx.load(str(source), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in _QUANTIZABLE and n.name and n.input[1:2]
            and n.input[1] in weights]  # fmt: skip


def _outputs(path: Path, feeds: Calibration) -> list[np.ndarray]:
    return [np.asarray(o, dtype=np.float64) for o in session(path).run(None, feeds)]


def rank_nodes(step: str, params: dict[str, Any], source: Path, calibration: Calibration, work: Path) -> list[str]:
    """Quantizable nodes, worst first, by the relative output error each causes when quantized alone."""
    feeds = {k: v[:_PROBE_SAMPLES] for k, v in calibration.items()}
    reference = _outputs(source, feeds)
    scored = []
    for i, node in enumerate(quantizable_nodes(source)):
        probe = work / f"probe-{i}.onnx"
        TRANSFORMS[step](source, probe, {**params, "nodes_to_quantize": [node]}, calibration)
        got = _outputs(probe, feeds)
        error = sum(
            float(np.linalg.norm(g - r) / (np.linalg.norm(r) or 1.0)) for g, r in zip(got, reference, strict=True)
        )
        scored.append((error, node))
        remove_model(probe)
    return [node for _, node in sorted(scored, reverse=True)]
