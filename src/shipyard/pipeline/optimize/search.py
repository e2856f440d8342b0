"""The optimize step: try each configured transform on the best model so far; keep it only if it passes both guards.

The best valid model is kept at every point, so a failed, timed-out or interrupted search still
registers the best variant found (the unoptimized model if none passed).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shipyard.errors import ShipyardError
from shipyard.pipeline._onnx import MODEL_FILE, check_onnx, random_feeds, run_in_chunks, session
from shipyard.pipeline.context import BuildContext
from shipyard.pipeline.evaluate import measure_latency, output_index
from shipyard.pipeline.optimize.guard import check_metric, paired_p50_ms
from shipyard.pipeline.optimize.transforms import TRANSFORMS
from shipyard.pipeline.step import NullProgress, Progress
from shipyard.spec.models import LatencySpec, MetricSpec, OptimizeSpec

_CHUNK = 256


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


class OptimizeStep:
    name = "optimize"
    description = "Optimize (guarded search)"

    def run(self, ctx: BuildContext, progress: Progress) -> dict[str, Any]:
        spec, evaluation, data = ctx.loaded.spec.optimize, ctx.loaded.spec.evaluation, ctx.eval_data
        model_path, signature = ctx.require_model()
        if spec is None or evaluation is None or data is None:
            raise RuntimeError("pipeline order: optimize runs only with an evaluation set")
        index = output_index(evaluation, signature)
        work = ctx.scratch_dir / "optimize"
        work.mkdir()
        best = work / "base.onnx"
        shutil.copyfile(model_path, best)
        if (model_path.parent / f"{MODEL_FILE}.data").exists():
            raise ShipyardError("optimizing models with external weights (> 2 GB) is not supported yet")

        def predict(path: Path) -> np.ndarray:
            sess = session(path)
            return run_in_chunks(lambda f: list(sess.run(None, f)), data.inputs, _CHUNK)[index]

        base_pred = predict(best)
        single = random_feeds(signature, batch=1, seed=3)
        candidates: list[Candidate] = []
        started = time.monotonic()
        for trial, step in enumerate(spec.steps):
            progress.update(trial, len(spec.steps))
            if trial >= spec.max_trials or time.monotonic() - started > spec.timeout_s:
                candidates.append(
                    Candidate(trial, step.step, step.params, False, "not tried: trial or time budget spent")
                )
                continue
            dest = work / f"trial{trial}-{step.step}.onnx"
            try:
                params = TRANSFORMS[step.step](best, dest, step.params, data.inputs)
                check_onnx(dest)
                verdict = Candidate(trial, step.step, params, False, "", size_bytes=dest.stat().st_size)
                self._judge(
                    verdict, spec, evaluation.metric, data.target, base_pred, predict(dest), (best, dest), single
                )
            except KeyboardInterrupt:
                candidates.append(Candidate(trial, step.step, step.params, False, "interrupted: search stopped"))
                break
            except ShipyardError as exc:
                verdict = Candidate(trial, step.step, step.params, False, f"failed: {exc}")
            except Exception as exc:  # the quantizer's and converter's own errors
                verdict = Candidate(trial, step.step, step.params, False, f"failed: {type(exc).__name__}: {exc}")
            candidates.append(verdict)
            if verdict.accepted:
                best = dest
        progress.update(len(spec.steps), len(spec.steps))
        accepted = [c for c in candidates if c.accepted]
        if accepted:
            self._adopt(ctx, best, evaluation.metric.name, accepted[-1].metric)
        return {
            "applied": [{"step": c.step, "params": c.params} for c in accepted],
            "candidates": [asdict(c) for c in candidates],
            "budget": {"max_drop": spec.max_drop, "relative": spec.relative, "confidence": spec.confidence},
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
            candidate.reason = (f"{metric.name} loss up to {check.drop_bound:.4g} "
                                f"({spec.confidence:.0%} bound) exceeds the budget {check.budget:.4g}")  # fmt: skip
            return
        parent_ms, ms = paired_p50_ms(session(models[0]), session(models[1]), single)
        candidate.p50_ms, candidate.parent_p50_ms = ms, parent_ms
        if ms > parent_ms * (1 - spec.min_speedup):
            candidate.reason = (f"not faster than its parent: p50 {ms:.3f} ms vs {parent_ms:.3f} ms "
                                f"(needs {spec.min_speedup:.0%} less)")  # fmt: skip
            return
        candidate.accepted = True
        candidate.reason = f"{parent_ms / ms:.2f}x faster, {metric.name} loss ≤ {check.drop_bound:.4g}"

    @staticmethod
    def _adopt(ctx: BuildContext, best: Path, metric: str, value: float | None) -> None:
        """Make the winner the artifact's model and re-measure it; the old figures keep an _unoptimized suffix."""
        model_path, signature = ctx.require_model()
        for key in (metric, "latency_p50_ms", "latency_p99_ms", "throughput_sps", "size_bytes"):
            if key in ctx.metrics:
                ctx.metrics[f"{key}_unoptimized"] = ctx.metrics.pop(key)
        shutil.copyfile(best, model_path)
        if value is not None:
            ctx.metrics[metric] = value
        ctx.metrics["size_bytes"] = float(sum(p.stat().st_size for p in ctx.artifact_dir.rglob("*") if p.is_file()))
        evaluation = ctx.loaded.spec.evaluation
        latency = evaluation.latency if evaluation is not None else LatencySpec()
        sess = session(model_path, threads=latency.threads)
        ctx.metrics.update(measure_latency(lambda f: sess.run(None, f), signature, latency, NullProgress()))
