"""Float zero points rewritten for the integer kernel: the same products, to float rounding."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from shipyard.pipeline.optimize.zero_points import integer_zero_points

K, N, BLOCK = 96, 8, 32


def _model(rng: np.random.Generator) -> tuple[onnx.ModelProto, np.ndarray]:
    """One MatMulNBits (4 bits, blocks of 32) with float zero points, as HQQ writes it, and its weights."""
    blocks = K // BLOCK
    codes = rng.integers(0, 16, (N, K)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, (N, blocks)).astype(np.float32)
    zeros = rng.uniform(0.0, 15.0, (N, blocks)).astype(np.float32)  # not integers
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(N, blocks, BLOCK // 2)
    weights = (codes.reshape(N, blocks, BLOCK) - zeros[..., None]) * scales[..., None]  # [N, blocks, BLOCK]
    node = helper.make_node("MatMulNBits", ["a", "b", "scales", "zeros"], ["y"], "mm", domain="com.microsoft",
                            K=K, N=N, bits=4, block_size=BLOCK)  # fmt: skip
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "seq", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", N])],
        [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales.reshape(-1), "scales"),
         numpy_helper.from_array(zeros.reshape(-1), "zeros")],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    return model, weights.reshape(N, K).T


def _run(model: onnx.ModelProto, a: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"a": a})[0])


def test_float_zero_points_become_the_default_zero_point_and_a_block_offset() -> None:
    rng = np.random.default_rng(0)
    model, weights = _model(rng)
    a = rng.standard_normal((2, 3, K)).astype(np.float32)
    before = _run(model, a)
    np.testing.assert_allclose(before, a @ weights, rtol=1e-4, atol=1e-4)  # what the node computes
    assert integer_zero_points(model) == 1
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    assert list(node.input) == ["a", "b", "scales"]  # no zero points: the integer kernel's default
    assert "zeros" not in {t.name for t in model.graph.initializer}
    np.testing.assert_allclose(_run(model, a), before, rtol=1e-4, atol=1e-4)
    assert integer_zero_points(model) == 0  # nothing left to rewrite
