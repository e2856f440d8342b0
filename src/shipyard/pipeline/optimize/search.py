"""The optimize step: try each configured transform on the best model so far; keep it only if it passes both guards.

The best valid model is kept at every point, so a failed, timed-out or interrupted search still
registers the best variant found (the unoptimized model if none passed).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from shipyard.artifact.layout import folder_size
from shipyard.errors import ShipyardError
from shipyard.onnxrt import (
    TENSORRT,
    TENSORRT_FILE,
    TensorrtRun,
    check_onnx,
    has_external_data,
    is_batchable,
    model_bytes,
    ort_predict,
    parameter_count,
    place_model,
    run_in_chunks,
    save_graph,
    save_streaming,
    session,
)
from shipyard.pipeline._torch import TorchSource
from shipyard.pipeline.context import BuildContext, EvalData
from shipyard.pipeline.datasets import load_dataset
from shipyard.pipeline.evaluate import measure_latency, output_index
from shipyard.pipeline.optimize.fallback import rank_nodes
from shipyard.pipeline.optimize.guard import check_metric, paired_p50_ms
from shipyard.pipeline.optimize.torch_steps import TorchSteps, Training
from shipyard.pipeline.optimize.transforms import QUANTIZERS, TRANSFORMS, check_params, quiet_root_logger
from shipyard.pipeline.step import NullProgress, Progress
from shipyard.spec.models import TORCH_STEPS, LatencySpec, MetricSpec, OptimizeSpec, OptimizeStepSpec


@dataclass
class Candidate:
    """One tried variant and the verdict, as the report shows it."""

    trial: int
    step: str
    params: dict[str, Any]
    accepted: bool
    reason: str
    metric: float | None = None
    drop_bound: float | None = None
    p50_ms: float | None = None
    parent_p50_ms: float | None = None
    size_bytes: int | None = None
    failed_guard: str | None = None  # "metric", "speed", "error" or "unavailable" (needs what is not here)
    built_on: int | None = None  # the trial whose model this one transformed (None: the unoptimized model)
    fallback: list[str] = field(default_factory=list)  # nodes kept in float
    path: Path | None = None

    def record(self) -> dict[str, Any]:
        """What the manifest keeps (the scratch path is not part of it)."""
        out = asdict(self)
        del out["path"]
        return out


def _advance(progress: Progress, step: int, steps: int, fraction: float) -> None:
    progress.update(step + fraction, steps)


def _named_copy(source: Path, dest: Path) -> Path:
    """Copy the model, giving unnamed nodes names: quantizers exclude nodes by name. Weights kept outside
    the graph are streamed to the copy's side file, not loaded."""
    model = onnx.load(str(source), load_external_data=False)
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    if has_external_data(model):
        return save_streaming(model, source.parent, dest)
    return save_graph(model, dest)


def applied_chain(candidates: list[Candidate], winner: Candidate | None) -> list[Candidate]:
    """The steps that produced the winner, first to last, following `built_on` links."""
    chain: list[Candidate] = []
    while winner is not None:
        chain.insert(0, winner)
        winner = candidates[winner.built_on] if winner.built_on is not None else None
    return chain


def _torch_steps(ctx: BuildContext, train: EvalData | None) -> TorchSteps:
    """The PyTorch steps' runner for this build: the source module, training data, loss for the metric."""
    spec, evaluation, data = ctx.loaded.spec, ctx.loaded.spec.evaluation, ctx.eval_data
    _, signature = ctx.require_model()
    if not isinstance(ctx.source, TorchSource) or spec.optimize is None or evaluation is None or data is None:
        raise RuntimeError("pipeline order: PyTorch steps run on a loaded torch source with an evaluation set")
    training = Training(
        data=train,
        output=output_index(evaluation, signature),
        metric=evaluation.metric.name,
    )
    return TorchSteps(ctx.source, signature, spec.convert, training, data.head(2), ctx.base_dir)


def explain(step: str, exc: Exception) -> str:
    """A transform's own exception in the spec's terms where its cause is known, else its type and text."""
    key = exc.args[0] if isinstance(exc, KeyError) and exc.args else None
    if step == "quantize_static" and isinstance(key, str) and key.endswith(("_scale", "_zero_point")):
        tensor = key.rsplit("_", 2 if key.endswith("_zero_point") else 1)[0]
        return (f"static INT8 found no calibration range for tensor {tensor!r} (ONNX Runtime's quantizer could "
                "not calibrate it, as happens on graphs an earlier step fused); list quantize_static before "
                "graph in optimize.steps, or use quantize_dynamic")  # fmt: skip
    return f"{type(exc).__name__}: {exc}"


class _Search:
    """One guarded search: every candidate tried so far, the best model, and the budgets that bound it."""

    def __init__(self, ctx: BuildContext, spec: OptimizeSpec, metric: MetricSpec, data: EvalData,
                 work: Path) -> None:  # fmt: skip
        evaluation = ctx.loaded.spec.evaluation
        assert evaluation is not None  # checked by OptimizeStep.run
        model_path, self.signature = ctx.require_model()
        self.spec, self.metric, self.data, self.work = spec, metric, data, work
        self.providers = ctx.loaded.spec.serve.providers()  # candidates are timed where they will be served
        self.index = output_index(evaluation, self.signature)
        self.base = self.best = _named_copy(model_path, work / "base.onnx")
        self.base_pred = self.predict(self.base)
        # Timed on real evaluation samples: random inputs can take shapes (e.g. sequence lengths) nobody sends.
        self.single = data.head(spec.speed_batch if is_batchable(self.signature) else 1)
        # Static quantization calibrates on the training data when the spec names it: the evaluation set
        # that judges the candidate then plays no part in making it.
        train = None if spec.train_data is None else load_dataset(spec.train_data, self.signature, ctx.base_dir,
                                                                   text=ctx.text)  # fmt: skip
        self.calibration = data.inputs if train is None else train.inputs
        self.torch = _torch_steps(ctx, train) if any(s.step in TORCH_STEPS for s in spec.steps) else None
        self.candidates: list[Candidate] = []
        self.winner: Candidate | None = None  # the accepted candidate `best` is, None for the unoptimized model
        self.held: Candidate | None = None  # good enough, but not faster on its own: later steps may build on it
        self.started = time.monotonic()

    def predict(self, path: Path, tensorrt: TensorrtRun | None = None) -> np.ndarray:
        """The model's outputs on the evaluation set: on the CPU, or on TensorRT for a candidate that is a
        way of running the graph there (its FP16 engines change the numbers the guard judges)."""
        sess = session(path) if tensorrt is None else session(path, preferred=self.providers, tensorrt=tensorrt)
        return run_in_chunks(ort_predict(sess), self.data.inputs, self.signature)[self.index]

    def spent(self) -> bool:
        return len(self.candidates) >= self.spec.max_trials or time.monotonic() - self.started > self.spec.timeout_s

    def step(self, step: OptimizeStepSpec) -> None:
        """Try one configured step on the best model, with node fallback for quantizers that lose accuracy,
        then on top of a held candidate."""
        fallback: list[str] = []
        ranking: list[str] | None = None
        for retries in range(self.spec.fallback_trials + 1):
            if self.spent():
                skipped = "not tried: trial or time budget spent"
                self.candidates.append(Candidate(len(self.candidates), step.step, step.params, False, skipped))
                break
            params = dict(step.params)
            if fallback:
                params["nodes_to_exclude"] = sorted({*params.get("nodes_to_exclude", []), *fallback})
            verdict = self._keep(self._attempt(step.step, params, self.winner))
            verdict.fallback = fallback
            if verdict.accepted or step.step not in QUANTIZERS or verdict.failed_guard != "metric":
                break
            if retries == self.spec.fallback_trials:
                break
            if ranking is None:
                with quiet_root_logger():
                    ranking = rank_nodes(step.step, dict(step.params), self.best, self.calibration, self.work)
            wider = ranking[: max(1, 2 * len(fallback))]
            if len(wider) <= len(fallback) or len(wider) >= len(ranking):
                break  # falling back further would leave nothing quantized
            fallback = wider
        alone = self.candidates[-1]
        # A step that kept the metric but was not faster alone (e.g. fusion) may pay off once a later step
        # builds on it: try this step on top of it too. Judged against the best so far, so acceptance means it
        # beats whatever this step achieved alone. A step this machine cannot run is not tried a second time.
        if (
            self.held is not None
            and alone.failed_guard != "unavailable"
            and len(self.candidates) < self.spec.max_trials
        ):
            self._keep(self._attempt(step.step, dict(step.params), self.held))
        self.held = alone if alone.failed_guard == "speed" else None

    def _keep(self, verdict: Candidate) -> Candidate:
        self.candidates.append(verdict)
        if verdict.accepted and verdict.path is not None:
            self.best, self.winner = verdict.path, verdict
        return verdict

    def _quantized_by(self, source: Candidate | None) -> Candidate | None:
        """The quantizer in the chain that made `source`'s model, if any."""
        while source is not None:
            if source.step in QUANTIZERS:
                return source
            source = self.candidates[source.built_on] if source.built_on is not None else None
        return None

    def _attempt(self, step: str, params: dict[str, Any], source: Candidate | None) -> Candidate:
        """Apply `step` to `source` (None: the unoptimized model); always judged against `best`."""
        trial = len(self.candidates)
        dest = self.work / f"trial{trial}-{step}.onnx"
        parent = source.path if source is not None and source.path is not None else self.base
        quantized = self._quantized_by(source) if step in QUANTIZERS else None
        if quantized is not None:  # ONNX Runtime's quantizers take float graphs; a second pass breaks them
            reason = (f"not tried on trial {quantized.trial}'s model: it is already quantized ({quantized.step}), "
                      "and quantizing twice is not supported")  # fmt: skip
            return Candidate(trial, step, params, False, reason, built_on=source.trial if source else None)
        if step == "tensorrt":
            return self._tensorrt(trial, params, source, parent)
        try:
            if self.torch is not None and step in TORCH_STEPS:
                applied = self.torch.apply(step, params, None if source is None else source.trial, trial, dest)
            else:
                with quiet_root_logger():  # onnxruntime's quantizer logs advice through the root logger
                    applied = TRANSFORMS[step](parent, dest, params, self.calibration)
            check_onnx(dest)
            verdict = Candidate(trial, step, applied, False, "", size_bytes=model_bytes(dest))
            self._judge(verdict, self.predict(dest), dest)
        except ShipyardError as exc:
            verdict = Candidate(trial, step, params, False, f"failed: {exc}", failed_guard="error")
        except Exception as exc:  # the quantizer's and converter's own errors
            verdict = Candidate(trial, step, params, False, f"failed: {explain(step, exc)}", failed_guard="error")
        verdict.path = dest
        verdict.built_on = None if source is None else source.trial
        return verdict

    def _tensorrt(self, trial: int, params: dict[str, Any], source: Candidate | None, graph: Path) -> Candidate:
        """`graph` run by TensorRT engines (FP16 unless `fp16: false`): the same file, judged as it would be
        served, against the best so far on the served providers without these options."""
        built_on = None if source is None else source.trial
        try:
            check_params(params, {"fp16"}, "tensorrt")
        except ShipyardError as exc:
            return Candidate(trial, "tensorrt", params, False, f"failed: {exc}", failed_guard="error",
                             built_on=built_on)  # fmt: skip
        applied = {"fp16": bool(params.get("fp16", True))}
        if TENSORRT not in ort.get_available_providers():
            reason = ("not tried: this machine's onnxruntime has no TensorRT provider (onnxruntime-gpu with "
                      "TensorRT's libraries, on an NVIDIA GPU)")  # fmt: skip
            return Candidate(trial, "tensorrt", applied, False, reason, failed_guard="unavailable", built_on=built_on)
        run = TensorrtRun(self.work / "tensorrt-engines", applied["fp16"])
        verdict = Candidate(trial, "tensorrt", applied, False, "", size_bytes=model_bytes(graph), built_on=built_on)
        try:
            self._judge(verdict, self.predict(graph, run), graph, run)
        except ShipyardError as exc:
            verdict.reason, verdict.failed_guard = f"failed: {exc}", "error"
        verdict.path = graph
        return verdict

    def _judge(self, candidate: Candidate, pred: np.ndarray, model: Path, tensorrt: TensorrtRun | None = None) -> None:
        """Fill in the verdict: the metric guard first (cheap to explain), then the speed guard against `best`."""
        spec, metric = self.spec, self.metric
        check = check_metric(metric, spec, self.base_pred, pred, self.data.target)
        candidate.metric, candidate.drop_bound = check.value, check.drop_bound
        if not check.passed:
            candidate.failed_guard = "metric"
            candidate.reason = (f"{metric.name} loss up to {check.drop_bound:.4g} "
                                f"({spec.confidence:.0%} bound) exceeds the budget {check.budget:.4g}")  # fmt: skip
            return
        parent_ms, ms = paired_p50_ms(session(self.best, preferred=self.providers),
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


class OptimizeStep:
    name = "optimize"
    description = "Optimize (guarded search)"

    def run(self, ctx: BuildContext, progress: Progress) -> dict[str, Any]:
        spec, evaluation, data = ctx.loaded.spec.optimize, ctx.loaded.spec.evaluation, ctx.eval_data
        ctx.require_model()
        if spec is None or evaluation is None or data is None:
            raise RuntimeError("pipeline order: optimize runs only with an evaluation set")
        work = ctx.scratch_dir / "optimize"
        work.mkdir()
        search = _Search(ctx, spec, evaluation.metric, data, work)
        try:
            for number, step in enumerate(spec.steps):
                progress.update(number, len(spec.steps))
                if search.torch is not None:
                    search.torch.on_epoch = functools.partial(_advance, progress, number, len(spec.steps))
                search.step(step)
        except KeyboardInterrupt:
            search.candidates.append(Candidate(len(search.candidates), "-", {}, False, "interrupted: search stopped"))
        progress.update(len(spec.steps), len(spec.steps))
        chain = applied_chain(search.candidates, search.winner)
        if search.winner is not None:
            tensorrt = None
            if search.winner.step == "tensorrt":  # the server runs the graph as the search timed it
                (ctx.artifact_dir / TENSORRT_FILE).write_text(json.dumps(search.winner.params))
                tensorrt = TensorrtRun(work / "tensorrt-engines", search.winner.params["fp16"])
            self._adopt(ctx, search.best, evaluation.metric.name, search.winner.metric, tensorrt)
        return {
            "applied": [{"step": c.step, "params": c.params} for c in chain],
            "candidates": [c.record() for c in search.candidates],
            "budget": {
                "max_drop": spec.max_drop,
                "relative": spec.relative,
                "confidence": spec.confidence,
                "speed_batch": spec.speed_batch,
            },
        }

    @staticmethod
    def _adopt(ctx: BuildContext, best: Path, metric: str, value: float | None, tensorrt: TensorrtRun | None) -> None:
        """Make the winner the artifact's model and re-measure it; the old figures keep an _unoptimized suffix."""
        model_path, signature = ctx.require_model()
        for key in (metric, "latency_p50_ms", "latency_p99_ms", "throughput_sps", "size_bytes", "parameters"):
            if key in ctx.metrics:
                ctx.metrics[f"{key}_unoptimized"] = ctx.metrics.pop(key)
        place_model(best, check_onnx(best), model_path)
        ctx.metrics["parameters"] = float(parameter_count(check_onnx(model_path)))
        if value is not None:
            ctx.metrics[metric] = value
        ctx.metrics["size_bytes"] = float(folder_size(ctx.artifact_dir))
        evaluation = ctx.loaded.spec.evaluation
        latency = evaluation.latency if evaluation is not None else LatencySpec()
        sess = session(model_path, latency.threads, ctx.loaded.spec.serve.providers(), tensorrt=tensorrt)
        timed = measure_latency(lambda f: sess.run(None, f), signature, latency, NullProgress(), ctx.eval_data)
        ctx.metrics.update(timed)
