"""The optimization steps: each turns a parent ONNX file into a candidate file (same signature).

All of them are onnxruntime's own tools (graph optimizer, quantizer, float16 converter). A source whose
weights live in a side file (a model over protobuf's 2 GB) gives a candidate that keeps them in one too.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from shipyard.errors import InvalidInputError
from shipyard.onnxrt import save_graph, uses_external_data
from shipyard.pipeline.optimize.zero_points import integer_zero_points
from shipyard.pipeline.serve_graph import logits_head

Calibration = dict[str, np.ndarray]
Transform = Callable[[Path, Path, dict[str, Any], Calibration], dict[str, Any]]

_GRAPH_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantizers log advice through the root logger, and the 4-bit one every node through its
    own: keep both out of a build's output."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def check_params(params: dict[str, Any], allowed: set[str], step: str) -> None:
    unknown = set(params) - allowed
    if unknown:
        raise InvalidInputError(
            f"optimize step {step}: unknown parameters {sorted(unknown)}; allowed {sorted(allowed)}"
        )


def graph(source: Path, dest: Path, params: dict[str, Any], calibration: Calibration) -> dict[str, Any]:
    """ONNX Runtime offline optimization (constant folding, fusions) saved as a new graph.

    `extended` fusions are CPU-portable; `all` would bake layouts specific to this machine's CPU.
    With `transformer: bert` (or gpt2, …), onnxruntime's transformer optimizer fuses attention, layer
    norm and GELU first.
    """
    check_params(params, {"level", "transformer"}, "graph")
    level = params.get("level", "extended")
    transformer = params.get("transformer")
    external = uses_external_data(source)
    if level not in _GRAPH_LEVELS:
        raise InvalidInputError(f"optimize step graph: level must be one of {sorted(_GRAPH_LEVELS)}, not {level!r}")
    if transformer is not None:
        from onnxruntime.transformers.optimizer import optimize_model

        fused = optimize_model(str(source), model_type=str(transformer), num_heads=0, hidden_size=0, opt_level=0)
        fused_path = dest.with_name(f"fused-{dest.name}")
        fused.save_model_to_file(str(fused_path), use_external_data_format=external)
        source = fused_path
    options = ort.SessionOptions()
    options.graph_optimization_level = _GRAPH_LEVELS[level]
    options.optimized_model_filepath = str(dest)
    if external:  # the optimized graph keeps its weights beside it, as its source did
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         f"{dest.name}.data")  # fmt: skip
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return {"level": level, "transformer": transformer} if transformer else {"level": level}


def quantize_dynamic(source: Path, dest: Path, params: dict[str, Any], calibration: Calibration) -> dict[str, Any]:
    """INT8 weights, activations quantized on the fly (MatMul/Gemm/attention-heavy models)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    check_params(params, {"per_channel", "weight_type", "nodes_to_exclude", "nodes_to_quantize"}, "quantize_dynamic")
    weight_type = params.get("weight_type", "QInt8")
    ort_quantize_dynamic(
        str(source), str(dest), use_external_data_format=uses_external_data(source),
        per_channel=bool(params.get("per_channel", False)),
        weight_type=QuantType[weight_type],
        nodes_to_exclude=list(params.get("nodes_to_exclude", [])),
        nodes_to_quantize=list(params.get("nodes_to_quantize", [])),
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )  # fmt: skip
    return {"per_channel": bool(params.get("per_channel", False)), "weight_type": weight_type,
            "nodes_to_exclude": list(params.get("nodes_to_exclude", []))}  # fmt: skip


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over in-memory samples, one sample per call."""

    def __init__(self, data: Calibration) -> None:
        count = len(next(iter(data.values())))
        self._items = iter([{k: v[i : i + 1] for k, v in data.items()} for i in range(count)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def quantize_static(source: Path, dest: Path, params: dict[str, Any], calibration: Calibration) -> dict[str, Any]:
    """INT8 weights and activations (QDQ format) with ranges calibrated on representative inputs."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    check_params(params, {"method", "per_channel", "calibration_samples", "nodes_to_exclude", "nodes_to_quantize"},
           "quantize_static")  # fmt: skip
    method = params.get("method", "MinMax")
    if method not in ("MinMax", "Entropy", "Percentile"):
        raise InvalidInputError("optimize step quantize_static: method must be MinMax, Entropy or Percentile")
    samples = int(params.get("calibration_samples", 128))
    subset = {k: v[:samples] for k, v in calibration.items()}
    ort_quantize_static(
        str(source), str(dest), _Reader(subset), use_external_data_format=uses_external_data(source),
        quant_format=QuantFormat.QDQ,
        per_channel=bool(params.get("per_channel", True)),
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod[method],
        nodes_to_exclude=list(params.get("nodes_to_exclude", [])),
        nodes_to_quantize=list(params.get("nodes_to_quantize", [])),
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )  # fmt: skip
    return {"method": method, "per_channel": bool(params.get("per_channel", True)),
            "calibration_samples": len(next(iter(subset.values()))),
            "nodes_to_exclude": list(params.get("nodes_to_exclude", []))}  # fmt: skip


def fp16(source: Path, dest: Path, params: dict[str, Any], calibration: Calibration) -> dict[str, Any]:
    """Half-precision weights and compute; inputs/outputs stay FP32 unless keep_io_types is false."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    check_params(params, {"keep_io_types"}, "fp16")
    keep = bool(params.get("keep_io_types", True))
    converted = OnnxModel(convert_float_to_float16(onnx.load(str(source)), keep_io_types=keep))
    converted.topological_sort()  # the converter appends the input casts after their consumers
    save_graph(converted.model, dest, external=uses_external_data(source))
    return {"keep_io_types": keep}


_ALGORITHMS = ("rtn", "k_quant", "hqq")


def _nbits(model: onnx.ModelProto, bits: int, block: int, algorithm: str, symmetric: bool, level: int | None,
           exclude: list[str], include: list[str] | None) -> onnx.ModelProto:  # fmt: skip
    """One MatMulNBitsQuantizer pass: round-to-nearest (symmetric, or asymmetric with zero points), k-quant's
    clipping search, or HQQ's half-quadratic fit of scales and zero points; none needs calibration data."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    config: nbits.WeightOnlyQuantConfig | None = None
    if algorithm == "k_quant":
        config = nbits.KQuantWeightOnlyQuantConfig()
    elif algorithm == "hqq":
        config = nbits.HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
    quantizer = nbits.MatMulNBitsQuantizer(
        model, bits=bits, block_size=block, is_symmetric=symmetric, accuracy_level=level, nodes_to_exclude=exclude,
        nodes_to_include=include, algo_config=config,
    )  # fmt: skip
    with warnings.catch_warnings():  # HQQ hands numpy buffers to torch, which warns about their flags
        warnings.simplefilter("ignore", UserWarning)
        quantizer.process()
    quantized: onnx.ModelProto = quantizer.model.model
    if algorithm == "hqq":  # its float zero points keep the CPU kernel off its integer path: made integer
        integer_zero_points(quantized)
        for node in quantized.graph.node:  # and HQQ's config takes no accuracy level: set it on its nodes
            set_already = any(a.name == "accuracy_level" for a in node.attribute)
            if level is not None and node.op_type == "MatMulNBits" and not set_already:
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    return quantized


def weight_only(source: Path, dest: Path, params: dict[str, Any], calibration: Calibration) -> dict[str, Any]:
    """4-bit (or 8-bit) block-quantized MatMul weights (MatMulNBits) for MatMul-heavy transformer models;
    `head_bits: 8` keeps a language model's output projection at 8 bits."""
    allowed = {"bits", "block_size", "symmetric", "accuracy_level", "algorithm", "head_bits", "nodes_to_exclude",
               "nodes_to_quantize"}  # fmt: skip
    check_params(params, allowed, "weight_only")
    bits, block = int(params.get("bits", 4)), int(params.get("block_size", 32))
    if bits not in (4, 8):
        raise InvalidInputError("optimize step weight_only: bits must be 4 or 8")
    algorithm = str(params.get("algorithm", "rtn"))
    if algorithm not in _ALGORITHMS:
        raise InvalidInputError(f"optimize step weight_only: algorithm must be one of {', '.join(_ALGORITHMS)}")
    # accuracy_level 4 lets the CPU kernel multiply in int8 (VNNI where the CPU has it); unset, it computes
    # in float32 after unpacking the weights.
    level = params.get("accuracy_level")
    if level is not None and level not in (0, 1, 2, 3, 4):
        raise InvalidInputError("optimize step weight_only: accuracy_level must be 0-4 (4: int8 compute)")
    symmetric = bool(params.get("symmetric", algorithm == "rtn"))  # k-quant and HQQ fit zero points
    if symmetric and algorithm != "rtn":
        raise InvalidInputError(f"optimize step weight_only: algorithm {algorithm} is asymmetric (zero points); "
                                "symmetric: true is for rtn")  # fmt: skip
    model = onnx.load(str(source))
    exclude = list(params.get("nodes_to_exclude", []))
    head_bits = params.get("head_bits")
    found = logits_head(model) if head_bits is not None and head_bits != bits else None
    head = found.name if found is not None and found.op_type == "MatMul" else None
    if head_bits is not None and head_bits not in (4, 8):
        raise InvalidInputError("optimize step weight_only: head_bits must be 4 or 8")
    if head_bits is not None and head_bits != bits and head is None:
        raise InvalidInputError("optimize step weight_only: head_bits is for language models (a MatMul that "
                                "writes `logits`); this graph has none")  # fmt: skip
    model = _nbits(model, bits, block, algorithm, symmetric, level, [*exclude, *([head] if head else [])],
                   list(params.get("nodes_to_quantize", [])) or None)  # fmt: skip
    if head is not None and head not in exclude:  # a second pass: only the head is still a MatMul with weights
        model = _nbits(model, int(head_bits or bits), block, "rtn", symmetric, level, [], [head])
    save_graph(model, dest, external=uses_external_data(source))
    return {"bits": bits, "block_size": block, "algorithm": algorithm, "symmetric": symmetric, "accuracy_level": level,
            "head_bits": head_bits if head is not None else None, "nodes_to_exclude": exclude}  # fmt: skip


QUANTIZERS = ("quantize_dynamic", "quantize_static", "weight_only")
TRANSFORMS: dict[str, Transform] = {
    "weight_only": weight_only,
    "graph": graph,
    "quantize_dynamic": quantize_dynamic,
    "quantize_static": quantize_static,
    "fp16": fp16,
}
