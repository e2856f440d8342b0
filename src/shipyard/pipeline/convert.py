"""Convert step: export the source to ONNX, place it in the artifact, and verify it numerically."""

from __future__ import annotations

from typing import Any

import numpy as np

from shipyard.errors import ConversionError
from shipyard.onnxrt import (
    MODEL_FILE,
    check_onnx,
    is_batchable,
    ort_predict,
    parameter_count,
    place_model,
    random_feeds,
    run_in_chunks,
    session,
    signature_of,
)
from shipyard.pipeline.context import BuildContext
from shipyard.pipeline.load import release
from shipyard.pipeline.signature import check_declared, check_produced, merge_signature
from shipyard.pipeline.step import Progress
from shipyard.pipeline.text import sample_feeds
from shipyard.spec.models import ToleranceSpec


def compare_outputs(
    original: list[np.ndarray], converted: list[np.ndarray], names: list[str], tolerance: ToleranceSpec
) -> dict[str, float]:
    """Max absolute/relative error over all outputs; ConversionError naming the worst output above tolerance."""
    if len(original) != len(converted):
        raise ConversionError(f"the original returns {len(original)} outputs, the ONNX graph {len(converted)}")
    worst_abs = worst_rel = 0.0
    for name, a, b in zip(names, original, converted, strict=True):
        a = np.asarray(a)
        if a.size != b.size:
            raise ConversionError(f"output {name!r}: shape {list(b.shape)} in ONNX vs {list(a.shape)} in the original")
        if a.dtype.kind in "OUS" or b.dtype.kind in "OUS":  # strings: equal or not
            if a.reshape(-1).tolist() != b.reshape(-1).tolist():
                raise ConversionError(f"output {name!r}: ONNX strings differ from the original's")
            continue
        a64, b64 = a.astype(np.float64).reshape(b.shape), b.astype(np.float64)
        diff = np.abs(a64 - b64)
        abs_err = float(diff.max(initial=0.0))
        rel_err = float((diff / np.maximum(np.abs(a64), 1e-12)).max(initial=0.0))
        worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
        if not np.allclose(b64, a64, atol=tolerance.atol, rtol=tolerance.rtol):
            bad = float(np.mean(diff > tolerance.atol + tolerance.rtol * np.abs(a64)))
            raise ConversionError(
                f"output {name!r} of the ONNX model differs from the original beyond tolerance "
                f"(atol={tolerance.atol:g}, rtol={tolerance.rtol:g}): max abs error {abs_err:.3g}, "
                f"max rel error {rel_err:.3g}, {bad:.1%} of values out of tolerance"
            )
    return {"max_abs_error": worst_abs, "max_rel_error": worst_rel}


def convert(ctx: BuildContext, progress: Progress) -> dict[str, Any]:
    """The tensor family's convert: the source exported to ONNX and verified against it."""
    if ctx.source is None or ctx.signature is None:
        raise RuntimeError("pipeline order: the load step must run before convert")
    spec = ctx.loaded.spec.convert
    exported = ctx.source.export_onnx(ctx.scratch_dir / MODEL_FILE, ctx.signature, spec)
    progress.update(1, 3)
    graph = check_onnx(exported.path)
    ctx.model_path = place_model(exported.path, graph, ctx.artifact_dir / MODEL_FILE)
    check_declared(ctx.signature, signature_of(graph))
    ctx.signature = merge_signature(ctx.signature, signature_of(graph))
    ctx.metrics["parameters"] = float(parameter_count(graph))
    progress.update(2, 3)

    if ctx.eval_data is not None:
        feeds = ctx.eval_data.head(spec.verify_samples)
    elif ctx.text is not None:  # token ids must come from the tokenizer: random ones fall outside the tables
        feeds = sample_feeds(ctx.text, 4)
    elif is_batchable(ctx.signature):
        feeds = random_feeds(ctx.signature, batch=min(spec.verify_samples, 16))
    else:
        feeds = random_feeds(ctx.signature, batch=1)
    sess = session(ctx.model_path)
    try:
        converted = run_in_chunks(ort_predict(sess), feeds, ctx.signature)
    except Exception as exc:  # onnxruntime's own exception types
        raise ConversionError(f"the ONNX model cannot run the verification inputs: {exc}") from None
    check_produced(ctx.signature, converted)
    del sess
    try:
        original = run_in_chunks(ctx.source.predict, feeds, ctx.signature)
    except Exception as exc:  # the user's model code
        last_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"the original model failed on the verification inputs: {last_line}") from None
    release(ctx.source)
    errors = compare_outputs(original, converted, [t.name for t in ctx.signature.outputs], spec.tolerance)
    ctx.metrics.update(errors)
    progress.update(3, 3)
    samples = len(next(iter(feeds.values())))
    return {**exported.params, "verify_samples": samples, "atol": spec.tolerance.atol,
            "rtol": spec.tolerance.rtol, **errors}  # fmt: skip
