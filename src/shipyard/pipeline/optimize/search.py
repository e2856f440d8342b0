"""The optimize step, for every model family: try each configured transform; keep a candidate only if the
family's judge accepts it (its quality guard, then its cost guard against the best so far).

A family's judge says how steps relate: chained (tensor models: each step builds on the best model so far)
or alternatives (language models: each made from the unoptimized model, the cheapest that passes kept).
The best valid model is kept at every point, so a failed, timed-out or interrupted search still
registers the best variant found (the unoptimized model if none passed).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import onnxruntime as ort

from shipyard.errors import ShipyardError
from shipyard.onnxrt import (
    TENSORRT,
    TensorrtRun,
    check_onnx,
    has_external_data,
    model_bytes,
    save_graph,
    save_streaming,
)
from shipyard.pipeline._torch import TorchSource
from shipyard.pipeline.context import BuildContext, EvalData
from shipyard.pipeline.evaluate import output_index
from shipyard.pipeline.optimize.candidate import Candidate
from shipyard.pipeline.optimize.fallback import rank_nodes
from shipyard.pipeline.optimize.torch_steps import TorchSteps, Training
from shipyard.pipeline.optimize.transforms import QUANTIZERS, TRANSFORMS, check_params, quiet_root_logger
from shipyard.pipeline.step import Progress
from shipyard.spec.models import TORCH_STEPS, OptimizeSpec, OptimizeStepSpec


class Judge(Protocol):
    """A family's verdict on candidates, and what it keeps of the winner."""

    chained: bool  # steps build on the best model so far; else each is made from the unoptimized model
    fallback: bool  # a quantizer that loses too much is tried again with its most sensitive nodes in float
    runtime_ops: bool  # candidates use ONNX Runtime's own operators (onnx.checker does not know them)
    calibration: dict[str, np.ndarray]  # inputs static quantization and node ranking calibrate on
    train: EvalData | None  # the spec's training data, for steps that learn (pruning, distillation)

    def judge(self, candidate: Candidate, model: Path, best: Path, tensorrt: TensorrtRun | None = None) -> None:
        """Fill in the verdict on `model` against `best`: accepted, or the guard that failed and why."""
        ...

    def finish(self, ctx: BuildContext, winner: Candidate | None, best: Path, work: Path) -> dict[str, Any]:
        """Make the winner (if any) the artifact's model and re-measure it; what the lineage records of the
        budget it was judged by."""
        ...


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

    def __init__(self, ctx: BuildContext, spec: OptimizeSpec, judge: Judge, work: Path) -> None:
        model_path, _ = ctx.require_model()
        self.spec, self.judge, self.work = spec, judge, work
        # Quantizers exclude nodes by name: the fallback needs every node named.
        self.base = self.best = _named_copy(model_path, work / "base.onnx") if judge.fallback else model_path
        self.torch = _torch_steps(ctx, judge.train) if any(s.step in TORCH_STEPS for s in spec.steps) else None
        self.candidates: list[Candidate] = []
        self.winner: Candidate | None = None  # the accepted candidate `best` is, None for the unoptimized model
        self.held: Candidate | None = None  # good enough, but not faster on its own: later steps may build on it
        self.started = time.monotonic()

    def spent(self) -> bool:
        return len(self.candidates) >= self.spec.max_trials or time.monotonic() - self.started > self.spec.timeout_s

    def step(self, step: OptimizeStepSpec) -> None:
        """Try one configured step on the best model, with node fallback for quantizers that lose accuracy,
        then on top of a held candidate."""
        fallback: list[str] = []
        ranking: list[str] | None = None
        source = self.winner if self.judge.chained else None
        retries_allowed = self.spec.fallback_trials if self.judge.fallback else 0
        for retries in range(retries_allowed + 1):
            if self.spent():
                skipped = "not tried: trial or time budget spent"
                self.candidates.append(Candidate(len(self.candidates), step.step, step.params, False, skipped))
                break
            params = dict(step.params)
            if fallback:
                params["nodes_to_exclude"] = sorted({*params.get("nodes_to_exclude", []), *fallback})
            verdict = self._keep(self._attempt(step.step, params, source))
            verdict.fallback = fallback
            if verdict.accepted or step.step not in QUANTIZERS or verdict.failed_guard != "metric":
                break
            if retries == retries_allowed:
                break
            if ranking is None:
                with quiet_root_logger():
                    ranking = rank_nodes(step.step, dict(step.params), self.best, self.judge.calibration, self.work)
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
            and self.judge.chained
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
                    applied = TRANSFORMS[step](parent, dest, params, self.judge.calibration)
            check_onnx(dest, runtime_ops=self.judge.runtime_ops)
            verdict = Candidate(trial, step, applied, False, "", size_bytes=model_bytes(dest))
            self.judge.judge(verdict, dest, self.best)
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
            self.judge.judge(verdict, graph, self.best, run)
        except ShipyardError as exc:
            verdict.reason, verdict.failed_guard = f"failed: {exc}", "error"
        verdict.path = graph
        return verdict


def optimize(ctx: BuildContext, progress: Progress, judge: Judge) -> dict[str, Any]:
    """Run the spec's steps as a guarded search judged by `judge`; the winner becomes the artifact's model."""
    spec = ctx.loaded.spec.optimize
    if spec is None:
        raise RuntimeError("pipeline order: optimize runs only with an optimize section")
    work = ctx.scratch_dir / "optimize"
    work.mkdir(exist_ok=True)
    search = _Search(ctx, spec, judge, work)
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
    budget = judge.finish(ctx, search.winner, search.best, work)
    return {
        "applied": [{"step": c.step, "params": c.params} for c in chain],
        "candidates": [c.record() for c in search.candidates],
        **budget,
    }
