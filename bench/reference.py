"""The reference model of the benchmarks: an MLP 784-512-512-10 in FP32 with a dynamic batch dimension."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def write_reference_mlp(path: Path, seed: int = 0) -> Path:
    """Gemm-ReLU-Gemm-ReLU-Gemm with random weights, built with onnx.helper (no framework needed)."""
    rng = np.random.default_rng(seed)
    sizes = [784, 512, 512, 10]
    nodes, inits, current = [], [], "input"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{i}")]
        out = "logits" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"{out}_pre" if out != "logits" else out]))
        if out != "logits":
            nodes.append(helper.make_node("Relu", [f"{out}_pre"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 784])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
