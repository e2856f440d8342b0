"""The tensor family's judge: a candidate keeps the evaluation metric within budget (a paired bootstrap bound
against the unoptimized model) and is faster than the best model so far, timed alternately with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from shipyard.artifact.layout import folder_size
from shipyard.onnxrt import (
    TENSORRT_FILE,
    TensorrtRun,
    check_onnx,
    is_batchable,
    ort_predict,
    parameter_count,
    place_model,
    run_in_chunks,
    session,
)
from shipyard.pipeline.context import BuildContext, EvalData
from shipyard.pipeline.datasets import load_dataset
from shipyard.pipeline.evaluate import measure_latency, output_index
from shipyard.pipeline.optimize.candidate import Candidate
from shipyard.pipeline.optimize.guard import check_metric, paired_p50_ms
from shipyard.pipeline.step import NullProgress
from shipyard.spec.models import LatencySpec


class TensorJudge:
    """Chained steps, node fallback for quantizers, judged on the evaluation set's metric and on speed."""

    chained = True
    fallback = True
    runtime_ops = False

    def __init__(self, ctx: BuildContext) -> None:
        spec, evaluation, data = ctx.loaded.spec.optimize, ctx.loaded.spec.evaluation, ctx.eval_data
        if spec is None or evaluation is None or data is None:
            raise RuntimeError("pipeline order: optimize runs only with an evaluation set")
        model_path, self.signature = ctx.require_model()
        self.spec, self.metric, self.data = spec, evaluation.metric, data
        self.providers = ctx.loaded.spec.serve.providers()  # candidates are timed where they will be served
        self.index = output_index(evaluation, self.signature)
        self.base_pred = self.predict(model_path)
        # Timed on real evaluation samples: random inputs can take shapes (e.g. sequence lengths) nobody sends.
        self.single = data.head(spec.speed_batch if is_batchable(self.signature) else 1)
        # Static quantization calibrates on the training data when the spec names it: the evaluation set
        # that judges the candidate then plays no part in making it.
        self.train: EvalData | None = None
        if spec.train_data is not None:
            self.train = load_dataset(spec.train_data, self.signature, ctx.base_dir, text=ctx.text)
        self.calibration = data.inputs if self.train is None else self.train.inputs

    def predict(self, path: Path, tensorrt: TensorrtRun | None = None) -> np.ndarray:
        """The model's outputs on the evaluation set: on the CPU, or on TensorRT for a candidate that is a
        way of running the graph there (its FP16 engines change the numbers the guard judges)."""
        sess = session(path) if tensorrt is None else session(path, preferred=self.providers, tensorrt=tensorrt)
        return run_in_chunks(ort_predict(sess), self.data.inputs, self.signature)[self.index]

    def judge(self, candidate: Candidate, model: Path, best: Path, tensorrt: TensorrtRun | None = None) -> None:
        """The metric guard first (cheap to explain), then the speed guard against `best`."""
        spec, metric = self.spec, self.metric
        check = check_metric(metric, spec, self.base_pred, self.predict(model, tensorrt), self.data.target)
        candidate.metric, candidate.drop_bound = check.value, check.drop_bound
        if not check.passed:
            candidate.failed_guard = "metric"
            candidate.reason = (f"{metric.name} loss up to {check.drop_bound:.4g} "
                                f"({spec.confidence:.0%} bound) exceeds the budget {check.budget:.4g}")  # fmt: skip
            return
        parent_ms, ms = paired_p50_ms(session(best, preferred=self.providers),
                                      session(model, preferred=self.providers, tensorrt=tensorrt),
                                      self.single)  # fmt: skip
        candidate.p50_ms, candidate.parent_p50_ms = ms, parent_ms
        if ms > parent_ms * (1 - spec.min_speedup):
            candidate.failed_guard = "speed"
            candidate.reason = (f"not faster than its parent: p50 {ms:.3f} ms vs {parent_ms:.3f} ms "
                                f"(needs {spec.min_speedup:.0%} less)")  # fmt: skip
            return
        candidate.accepted = True
        candidate.reason = f"{parent_ms / ms:.2f}x faster, {metric.name} loss ≤ {check.drop_bound:.4g}"

    def finish(self, ctx: BuildContext, winner: Candidate | None, best: Path, work: Path) -> dict[str, Any]:
        if winner is not None:
            tensorrt = None
            if winner.step == "tensorrt":  # the server runs the graph as the search timed it
                (ctx.artifact_dir / TENSORRT_FILE).write_text(json.dumps(winner.params))
                tensorrt = TensorrtRun(work / "tensorrt-engines", winner.params["fp16"])
            self._adopt(ctx, best, winner.metric, tensorrt)
        spec = self.spec
        return {"budget": {"max_drop": spec.max_drop, "relative": spec.relative, "confidence": spec.confidence,
                           "speed_batch": spec.speed_batch}}  # fmt: skip

    def _adopt(self, ctx: BuildContext, best: Path, value: float | None, tensorrt: TensorrtRun | None) -> None:
        """Make the winner the artifact's model and re-measure it; the old figures keep an _unoptimized suffix."""
        model_path, signature = ctx.require_model()
        metric = self.metric.name
        for key in (metric, "latency_p50_ms", "latency_p99_ms", "throughput_sps", "size_bytes", "parameters"):
            if key in ctx.metrics:
                ctx.metrics[f"{key}_unoptimized"] = ctx.metrics.pop(key)
        graph = check_onnx(best)
        place_model(best, graph, model_path)
        ctx.metrics["parameters"] = float(parameter_count(graph))
        if value is not None:
            ctx.metrics[metric] = value
        ctx.metrics["size_bytes"] = float(folder_size(ctx.artifact_dir))
        evaluation = ctx.loaded.spec.evaluation
        latency = evaluation.latency if evaluation is not None else LatencySpec()
        sess = session(model_path, latency.threads, ctx.loaded.spec.serve.providers(), tensorrt=tensorrt)
        timed = measure_latency(lambda f: sess.run(None, f), signature, latency, NullProgress(), ctx.eval_data)
        ctx.metrics.update(timed)
