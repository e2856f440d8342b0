"""The graph a language model is served with: its output projection applied to the last position only.

The exported decoder writes logits for every position of a prompt chunk; the server samples from the last
one. At a 49 k vocabulary a 128-token chunk is 25 MB of logits and 128 times the output projection's work
(the largest MatMul of a small model); the build's perplexity needs them all, the server does not. So the
build scores the exported graph, and the artifact gets the same graph with a Slice of the last position in
front of the output projection, checked against it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from shipyard.artifact.manifest import GenerationRecord
from shipyard.errors import ConversionError
from shipyard.onnxrt import MODEL_FILE, check_onnx, place_model, save_graph, signature_of, uses_external_data
from shipyard.pipeline.context import BuildContext
from shipyard.pipeline.scoring import Scorer

_PASS_THROUGH = ("Cast", "Reshape", "Identity")  # ops between the output projection and `logits`


def logits_head(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The MatMul (or MatMulNBits) that writes `logits`, the output projection, if the graph has one."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get("logits") if any(o.name == "logits" for o in model.graph.output) else None
    while node is not None and node.op_type not in ("MatMul", "MatMulNBits"):
        node = producers.get(node.input[0]) if node.op_type in _PASS_THROUGH else None
    return node


def last_position_logits(model: onnx.ModelProto) -> bool:
    """Make `logits` the last position's only ([batch, 1, vocab]), in place; False when the graph has no
    output projection to move the cut in front of."""
    head = logits_head(model)
    if head is None:
        return False
    graph = model.graph
    hidden, last = head.input[0], f"{head.name}/last_position"
    graph.initializer.extend([numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{last}/starts"),
                              numpy_helper.from_array(np.array([np.iinfo(np.int64).max]), f"{last}/ends"),
                              numpy_helper.from_array(np.array([1], dtype=np.int64), f"{last}/axes")])  # fmt: skip
    cut = helper.make_node("Slice", [hidden, f"{last}/starts", f"{last}/ends", f"{last}/axes"], [last], last)
    head.input[0] = last
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes[: nodes.index(head)], cut, *nodes[nodes.index(head) :]])
    output = next(o for o in graph.output if o.name == "logits")
    position = output.type.tensor_type.shape.dim[1]
    position.Clear()
    position.dim_value = 1
    return True


def serve_last_position(ctx: BuildContext, record: GenerationRecord, window: np.ndarray) -> dict[str, Any]:
    """Give the artifact the graph that returns the last position's logits only, checked on one held-out
    window against the graph it replaces (the same last-position logits, to float rounding)."""
    model_path, _ = ctx.require_model()
    model = onnx.load(str(model_path))
    if not last_position_logits(model):
        return {"trimmed": False, "reason": "no output projection writes `logits`"}
    (ctx.scratch_dir / "serve").mkdir()
    trimmed = save_graph(model, ctx.scratch_dir / "serve" / MODEL_FILE, external=uses_external_data(model_path))
    prompt, total = window[None, :], [len(window)]
    expected = Scorer(model_path, record).runner.run(0, prompt, total)
    produced = Scorer(trimmed, record).runner.run(0, prompt, total)
    worst = float(np.abs(expected - produced).max())
    if produced.shape != expected.shape or worst > 1e-4 * max(1.0, float(np.abs(expected).max())):
        raise ConversionError(f"the graph cut to the last position's logits differs from the whole one by {worst:.3g}")
    ctx.model_path = place_model(trimmed, check_onnx(trimmed, runtime_ops=True), model_path)
    ctx.signature = signature_of(check_onnx(ctx.model_path, runtime_ops=True))
    return {"trimmed": True, "logits": "last position", "max_abs_difference": worst}
