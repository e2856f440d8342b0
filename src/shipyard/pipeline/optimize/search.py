"""The optimize step: try each configured transform on the best model so far; keep it only if it passes both guards.

The best valid model is kept at every point, so a failed, timed-out or interrupted search still
registers the best variant found (the unoptimized model if none passed).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from shipyard.artifact.layout import folder_size
from shipyard.errors import ShipyardError
from shipyard.onnxrt import (
    MODEL_FILE,
    check_onnx,
    is_batchable,
    ort_predict,
    parameter_count,
    run_in_chunks,
    session,
)
from shipyard.pipeline._torch import TorchSource
from shipyard.pipeline.context import BuildContext, EvalData
from shipyard.pipeline.datasets import load_dataset
from shipyard.pipeline.evaluate import measure_latency, output_index
from shipyard.pipeline.optimize.fallback import rank_nodes
from shipyard.pipeline.optimize.guard import check_metric, paired_p50_ms
from shipyard.pipeline.optimize.torch_steps import TorchSteps, Training
from shipyard.pipeline.optimize.transforms import QUANTIZERS, TRANSFORMS
from shipyard.pipeline.step import NullProgress, Progress
from shipyard.spec.models import TORCH_STEPS, LatencySpec, MetricSpec, OptimizeSpec


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
    failed_guard: str | None = None  # "metric", "speed" or "error"
    built_on: int | None = None  # the trial whose model this one transformed (None: the unoptimized model)
    fallback: list[str] = field(default_factory=list)  # nodes kept in float
    path: Path | None = None

    def record(self) -> dict[str, Any]:
        """What the manifest keeps (the scratch path is not part of it)."""
        out = asdict(self)
        del out["path"]
        return out


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _advance(progress: Progress, step: int, steps: int, fraction: float) -> None:
    progress.update(step + fraction, steps)


def _named_copy(source: Path, dest: Path) -> Path:
    """Copy the model, giving unnamed nodes names: quantizers exclude nodes by name."""
    model = onnx.load(str(source))
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    onnx.save(model, str(dest))
    return dest


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


class OptimizeStep:
    name = "optimize"
    description = "Optimize (guarded search)"

    def run(self, ctx: BuildContext, progress: Progress) -> dict[str, Any]:
        spec, evaluation, data = ctx.loaded.spec.optimize, ctx.loaded.spec.evaluation, ctx.eval_data
        model_path, signature = ctx.require_model()
        if spec is None or evaluation is None or data is None:
            raise RuntimeError("pipeline order: optimize runs only with an evaluation set")
        if (model_path.parent / f"{MODEL_FILE}.data").exists():
            raise ShipyardError("optimizing models with external weights (> 2 GB) is not supported yet")
        index = output_index(evaluation, signature)
        work = ctx.scratch_dir / "optimize"
        work.mkdir()
        base = best = _named_copy(model_path, work / "base.onnx")

        def predict(path: Path) -> np.ndarray:
            return run_in_chunks(ort_predict(session(path)), data.inputs, signature)[index]

        base_pred = predict(best)
        # Timed on real evaluation samples: random inputs can take shapes (e.g. sequence lengths) nobody sends.
        single = data.head(spec.speed_batch if is_batchable(signature) else 1)
        # Static quantization calibrates on the training data when the spec names it: the evaluation set
        # that judges the candidate then plays no part in making it.
        train = (
            None if spec.train_data is None else load_dataset(spec.train_data, signature, ctx.base_dir, text=ctx.text)
        )
        calibration = data.inputs if train is None else train.inputs
        candidates: list[Candidate] = []
        torch_runner = _torch_steps(ctx, train) if any(s.step in TORCH_STEPS for s in spec.steps) else None
        started = time.monotonic()

        def attempt(step: str, params: dict[str, Any], source: Candidate | None) -> Candidate:
            """Apply `step` to `source` (None: the unoptimized model); always judged against `best`."""
            trial = len(candidates)
            dest = work / f"trial{trial}-{step}.onnx"
            parent = source.path if source is not None and source.path is not None else base
            try:
                if torch_runner is not None and step in TORCH_STEPS:
                    applied = torch_runner.apply(step, params, None if source is None else source.trial, trial, dest)
                else:
                    with _quiet_root_logger():  # onnxruntime's quantizer logs advice through the root logger
                        applied = TRANSFORMS[step](parent, dest, params, calibration)
                check_onnx(dest)
                verdict = Candidate(trial, step, applied, False, "", size_bytes=dest.stat().st_size)
                judged = predict(dest)
                self._judge(verdict, spec, evaluation.metric, data.target, base_pred, judged, (best, dest), single)
            except ShipyardError as exc:
                verdict = Candidate(trial, step, params, False, f"failed: {exc}", failed_guard="error")
            except Exception as exc:  # the quantizer's and converter's own errors
                reason = f"failed: {type(exc).__name__}: {exc}"
                verdict = Candidate(trial, step, params, False, reason, failed_guard="error")
            verdict.path = dest
            verdict.built_on = None if source is None else source.trial
            return verdict

        winner: Candidate | None = None  # the accepted candidate `best` is, None for the unoptimized model
        held: Candidate | None = None  # good enough, but not faster on its own: later steps may build on it
        try:
            for number, step in enumerate(spec.steps):
                progress.update(number, len(spec.steps))
                if torch_runner is not None:
                    torch_runner.on_epoch = functools.partial(_advance, progress, number, len(spec.steps))
                fallback: list[str] = []
                ranking: list[str] | None = None
                retries = 0
                while True:
                    if len(candidates) >= spec.max_trials or time.monotonic() - started > spec.timeout_s:
                        skipped = "not tried: trial or time budget spent"
                        candidates.append(Candidate(len(candidates), step.step, step.params, False, skipped))
                        break
                    params = dict(step.params)
                    if fallback:
                        params["nodes_to_exclude"] = sorted({*params.get("nodes_to_exclude", []), *fallback})
                    verdict = attempt(step.step, params, winner)
                    verdict.fallback = fallback
                    candidates.append(verdict)
                    if verdict.accepted and verdict.path is not None:
                        best, winner = verdict.path, verdict
                        break
                    recoverable = step.step in QUANTIZERS and verdict.failed_guard == "metric"
                    if not recoverable or retries >= spec.fallback_trials:
                        break
                    retries += 1
                    if ranking is None:
                        with _quiet_root_logger():
                            ranking = rank_nodes(step.step, dict(step.params), best, calibration, work)
                    wider = ranking[: max(1, 2 * len(fallback))]
                    if len(wider) <= len(fallback) or len(wider) >= len(ranking):
                        break  # falling back further would leave nothing quantized
                    fallback = wider
                alone = candidates[-1]
                # A step that kept the metric but was not faster alone (e.g. fusion) may pay off once a
                # later step builds on it: try this step on top of it too. Judged against the best so far,
                # so acceptance means it beats whatever this step achieved alone.
                if held is not None and len(candidates) < spec.max_trials:
                    combined = attempt(step.step, dict(step.params), held)
                    candidates.append(combined)
                    if combined.accepted and combined.path is not None:
                        best, winner = combined.path, combined
                held = alone if alone.failed_guard == "speed" else None
        except KeyboardInterrupt:
            candidates.append(Candidate(len(candidates), "-", {}, False, "interrupted: search stopped"))
        progress.update(len(spec.steps), len(spec.steps))
        chain = applied_chain(candidates, winner)
        if winner is not None:
            self._adopt(ctx, best, evaluation.metric.name, winner.metric)
        return {
            "applied": [{"step": c.step, "params": c.params} for c in chain],
            "candidates": [c.record() for c in candidates],
            "budget": {
                "max_drop": spec.max_drop,
                "relative": spec.relative,
                "confidence": spec.confidence,
                "speed_batch": spec.speed_batch,
            },
        }

    @staticmethod
    def _judge(
        candidate: Candidate,
        spec: OptimizeSpec,
        metric: MetricSpec,
        target: np.ndarray,
        base_pred: np.ndarray,
        pred: np.ndarray,
        models: tuple[Path, Path],
        single: dict[str, np.ndarray],
    ) -> None:
        """Fill in the verdict: the metric guard first (cheap to explain), then the speed guard."""
        check = check_metric(metric, spec, base_pred, pred, target)
        candidate.metric, candidate.drop_bound = check.value, check.drop_bound
        if not check.passed:
            candidate.failed_guard = "metric"
            candidate.reason = (f"{metric.name} loss up to {check.drop_bound:.4g} "
                                f"({spec.confidence:.0%} bound) exceeds the budget {check.budget:.4g}")  # fmt: skip
            return
        parent_ms, ms = paired_p50_ms(session(models[0]), session(models[1]), single)
        candidate.p50_ms, candidate.parent_p50_ms = ms, parent_ms
        if ms > parent_ms * (1 - spec.min_speedup):
            candidate.failed_guard = "speed"
            candidate.reason = (f"not faster than its parent: p50 {ms:.3f} ms vs {parent_ms:.3f} ms "
                                f"(needs {spec.min_speedup:.0%} less)")  # fmt: skip
            return
        candidate.accepted = True
        candidate.reason = f"{parent_ms / ms:.2f}x faster, {metric.name} loss ≤ {check.drop_bound:.4g}"

    @staticmethod
    def _adopt(ctx: BuildContext, best: Path, metric: str, value: float | None) -> None:
        """Make the winner the artifact's model and re-measure it; the old figures keep an _unoptimized suffix."""
        model_path, signature = ctx.require_model()
        for key in (metric, "latency_p50_ms", "latency_p99_ms", "throughput_sps", "size_bytes", "parameters"):
            if key in ctx.metrics:
                ctx.metrics[f"{key}_unoptimized"] = ctx.metrics.pop(key)
        shutil.copyfile(best, model_path)
        ctx.metrics["parameters"] = float(parameter_count(check_onnx(model_path)))
        if value is not None:
            ctx.metrics[metric] = value
        ctx.metrics["size_bytes"] = float(folder_size(ctx.artifact_dir))
        evaluation = ctx.loaded.spec.evaluation
        latency = evaluation.latency if evaluation is not None else LatencySpec()
        sess = session(model_path, threads=latency.threads)
        timed = measure_latency(lambda f: sess.run(None, f), signature, latency, NullProgress(), ctx.eval_data)
        ctx.metrics.update(timed)
