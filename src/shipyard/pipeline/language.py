"""The build of a causal language model from a Hugging Face folder: load, export, verify, judge, compress.

- load: the folder checked (read_folder) and its model in PyTorch, the held-out text cut into windows;
- convert: ONNX Runtime GenAI's builder writes the decoder graph; it is verified against PyTorch on the
  held-out windows (logits within tolerance, the greedy next token identical at every position) and by a
  greedy generation through the cache that must equal transformers' own `generate()`;
- evaluate: perplexity of both, and the decode step's latency through the same cache the server uses;
- optimize: INT8 (dynamic) and 4-bit weight-only candidates, alternatives each made from the unoptimized
  model; one passes when its perplexity stays within budget (a paired bootstrap bound over the windows),
  its greedy tokens agree with the unoptimized model's often enough, and it improves the spec's objective
  (decode latency, size, or the resident memory a fresh process needs to serve it). The passing one with the
  lowest cost is registered.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shipyard.artifact.hashing import sha256_file
from shipyard.artifact.layout import folder_size
from shipyard.artifact.manifest import GenerationRecord
from shipyard.dtypes import numpy_of
from shipyard.errors import ConversionError, EvaluationError, ShipyardError, SpecError
from shipyard.kvcache import CacheSlots, StepRunner
from shipyard.onnxrt import MODEL_FILE, check_onnx, model_bytes, parameter_count, place_model, session, signature_of
from shipyard.pipeline._gguf import check_gguf, gguf_folder
from shipyard.pipeline._hf import HfFolder, builder_layout, export_decoder, load_torch_model, read_folder, weights_hash
from shipyard.pipeline.context import BuildContext
from shipyard.pipeline.optimize import transforms
from shipyard.pipeline.optimize.guard import MetricCheck, budget
from shipyard.pipeline.optimize.search import explain
from shipyard.pipeline.step import Progress
from shipyard.spec.models import (
    GenerationSpec,
    OptimizeSpec,
    OptimizeStepSpec,
    ShipyardSpec,
    TextDatasetSpec,
    ToleranceSpec,
    resolve_path,
)
from shipyard.tokenizer import load_tokenizer

GREEDY_CHECK_TOKENS = 32  # tokens generated through the cache and compared with transformers' generate()
DECODE_TIMING_STEPS = 64


@dataclass
class LanguageBuild:
    """What the language-model steps share."""

    folder: HfFolder
    torch_model: Any
    windows: np.ndarray  # [n, window] token ids of the held-out text (or of a fixed random draw)
    record: GenerationRecord | None = None
    nll: np.ndarray | None = None  # the exported model's per-window mean negative log-likelihood
    greedy: np.ndarray | None = None  # its greedy next token at every held-out position


def _windows(spec: ShipyardSpec, folder: HfFolder, base_dir: Path, context: int) -> np.ndarray:
    """Held-out token windows; without an evaluation set, a fixed random draw (verification only)."""
    dataset = spec.evaluation.dataset if spec.evaluation is not None else None
    if not isinstance(dataset, TextDatasetSpec):
        vocab = int(folder.config.get("vocab_size", 256))
        return np.random.default_rng(0).integers(0, vocab, (4, min(64, context)))
    path = resolve_path(base_dir, dataset.path)
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"evaluation.dataset: cannot read {path} as UTF-8 text: {exc}") from None
    tokenizer = load_tokenizer(folder.tokenizer_file)
    ids = [i for line in lines for i in tokenizer.encode(line + "\n", add_special_tokens=False).ids]
    width = min(dataset.window, context)
    count = len(ids) // width
    if count < 2:
        raise SpecError(f"evaluation.dataset: {path} has {len(ids)} tokens, fewer than two windows of {width}")
    limit = spec.evaluation.max_samples if spec.evaluation is not None else None
    return np.asarray(ids[: count * width]).reshape(count, width)[:limit]


class LanguageLoadStep:
    name = "load"
    description = "Load the language model and held-out text"

    def run(self, ctx: BuildContext, progress: Progress) -> dict[str, Any]:
        spec = ctx.loaded.spec
        source, from_gguf = spec.model, None
        if source.format == "gguf":  # read into a plain folder, then built like one
            assert source.path is not None
            path = resolve_path(ctx.base_dir, source.path).resolve()
            info = check_gguf(path)
            made = gguf_folder(path, ctx.scratch_dir / "from-gguf")
            source = source.model_copy(update={"format": "huggingface", "path": str(made), "task": "text-generation"})
            from_gguf = info.record(path)
        folder = read_folder(source, ctx.base_dir)
        model = load_torch_model(folder, spec.model.trust_remote_code)
        ctx.source_sha256 = weights_hash(folder.path) if from_gguf is None else sha256_file(path)
        context = int(folder.config.get("max_position_embeddings", 2048))
        if spec.model.generation is not None and spec.model.generation.context is not None:
            context = min(context, spec.model.generation.context)  # windows must fit the served context
        ctx.language = LanguageBuild(folder, model, _windows(spec, folder, ctx.base_dir, context))
        progress.update(1, 1)
        parameters = sum(p.numel() for p in model.parameters())
        return {"format": spec.model.format, "task": folder.task, "path": Path(spec.model.path or "").name,
                "architecture": folder.config["model_type"], "parameters": parameters,
                "windows": len(ctx.language.windows), "window": int(ctx.language.windows.shape[1]),
                **({"gguf": from_gguf} if from_gguf is not None else {})}  # fmt: skip


def _record(
    folder: HfFolder, layout: dict[str, Any], spec: GenerationSpec, cache_bytes_per_slot: int
) -> GenerationRecord:
    context = min(layout.pop("context"), spec.context or 1 << 30)
    slots = spec.max_running
    if spec.kv_cache_mb is not None:
        per_slot = cache_bytes_per_slot * context / 2**20
        slots = max(1, min(slots, int(spec.kv_cache_mb // per_slot)))
    return GenerationRecord(
        tokenizer_file="tokenizer.json", max_new_tokens=spec.max_new_tokens, context=context,
        eos_token_ids=folder.eos_token_ids(), chat_template=folder.chat_template(),
        special_tokens=folder.special_tokens(), prefix_cache=spec.prefix_cache, max_running=slots,
        sampling={**folder.sampling_defaults(), **(spec.sampling.model_dump(exclude_none=True) if spec.sampling
                                                     else {})},
        max_waiting=spec.max_waiting, prefill_chunk=spec.prefill_chunk, **layout,
    )  # fmt: skip


class Scorer:
    """Runs an exported decoder over token windows through the serving cache layout."""

    def __init__(self, model: Path, record: GenerationRecord) -> None:
        self.session = session(model, threads=0)
        inputs = {t.name: t for t in signature_of(check_onnx(model, runtime_ops=True)).inputs}
        self.cache = CacheSlots(record, 1, numpy_of(inputs[record.past_key % 0].dtype))
        self.runner = StepRunner(self.session, self.cache, numpy_of(inputs["input_ids"].dtype))

    def logits(self, window: np.ndarray) -> np.ndarray:
        """Every position's logits of one window (prefilled from an empty cache) [width, vocab]."""
        logits: np.ndarray = self.runner.run(0, window[None, :], [len(window)], every_position=True)[0]
        return logits

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-window mean negative log-likelihood of the next token, and the greedy next token everywhere."""
        nll, greedy = [], []
        for window in windows:
            logits = self.logits(window)
            nll.append(float(_nll(logits[None], window[None])[0]))
            greedy.append(logits.argmax(-1))
        return np.asarray(nll), np.asarray(greedy)

    def generate(self, prompt: list[int], steps: int, eos: set[int]) -> list[int]:
        """Greedy tokens through the cache (one prefill, then one position per step), up to an end token."""
        logits = self.runner.run(0, np.asarray([prompt]), [len(prompt)])
        out = [int(logits[0].argmax())]
        for _ in range(steps - 1):
            if out[-1] in eos:
                break
            logits = self.runner.run(0, np.asarray([[out[-1]]]), [len(prompt) + len(out)])
            out.append(int(logits[0].argmax()))
        return out

    def decode_ms(self, steps: int) -> list[float]:
        """Decode-step times at batch 1, halfway into the context."""
        total = min(self.cache.context // 2, 128)
        self.runner.run(0, np.ones((1, total), dtype=np.int64), [total])
        times = []
        for i in range(steps):
            start = time.perf_counter()
            self.runner.run(0, np.ones((1, 1), dtype=np.int64), [total + 1 + i % 8])
            times.append((time.perf_counter() - start) * 1e3)
        return times


def _torch_reference(model: Any, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.no_grad():
        logits = model(torch.from_numpy(windows)).logits.float().numpy()
    return logits, logits.argmax(-1)


class LanguageConvertStep:
    name = "convert"
    description = "Export with ONNX Runtime GenAI and verify against PyTorch"

    def run(self, ctx: BuildContext, progress: Progress) -> dict[str, Any]:
        lm = ctx.language
        assert lm is not None, "pipeline order: load runs before convert"
        spec = ctx.loaded.spec
        exported = export_decoder(lm.folder, ctx.scratch_dir / "export")
        progress.update(1, 3)
        graph = check_onnx(exported, runtime_ops=True)
        ctx.model_path = place_model(exported, graph, ctx.artifact_dir / MODEL_FILE)
        ctx.signature = signature_of(graph)
        ctx.metrics["parameters"] = float(parameter_count(graph))
        layout = builder_layout(exported.parent)
        per_slot = 2 * layout["layers"] * layout["kv_heads"] * layout["head_size"] * 4
        lm.record = _record(lm.folder, layout, spec.model.generation or GenerationSpec(), per_slot)
        shutil.copyfile(lm.folder.tokenizer_file, ctx.artifact_dir / lm.record.tokenizer_file)
        ctx.generation = lm.record
        progress.update(2, 3)

        try:
            params = self._verify(lm, Scorer(ctx.model_path, lm.record), spec.convert.tolerance)
        except RuntimeError as exc:  # onnxruntime's own failures (an operator's unsupported shape, ...)
            reason = str(exc).split("Status Message: ")[-1].strip()
            raise ConversionError(f"ONNX Runtime cannot run the exported decoder: {reason}") from None
        ctx.metrics["max_abs_error"] = params["max_abs_error"]
        progress.update(3, 3)
        return {"converter": "onnxruntime-genai model builder", "precision": "fp32", **params, **lm.record.model_dump(
            include={"context", "layers", "kv_heads", "head_size", "max_running"})}  # fmt: skip

    @staticmethod
    def _verify(lm: LanguageBuild, scorer: Scorer, tolerance: ToleranceSpec) -> dict[str, Any]:
        """Logits and greedy next tokens against PyTorch on the windows, then a greedy generation through the
        cache against transformers' generate()."""
        import torch
        import transformers

        assert lm.record is not None
        worst, positions = 0.0, 0
        for window in lm.windows[: max(1, 256 // lm.windows.shape[1])]:  # a few hundred positions
            reference, reference_greedy = _torch_reference(lm.torch_model, window[None, :])
            converted = scorer.logits(window)
            worst = max(worst, float(np.abs(converted - reference[0]).max()))
            if not np.allclose(converted, reference[0], atol=tolerance.atol, rtol=tolerance.rtol):
                raise ConversionError(f"the ONNX logits differ from PyTorch's by up to {worst:.3g} (atol "
                                      f"{tolerance.atol:g}, rtol {tolerance.rtol:g})")  # fmt: skip
            differ = int((converted.argmax(-1) != reference_greedy[0]).sum())
            if differ:
                raise ConversionError(f"the ONNX model's greedy next token differs from PyTorch's at {differ} of "
                                      f"{len(window)} positions")  # fmt: skip
            positions += len(window)
        prompt = [int(t) for t in lm.windows[0][:8]]
        steps = min(GREEDY_CHECK_TOKENS, lm.record.context - len(prompt))
        eos = lm.record.eos_token_ids
        # Plain greedy decoding, whatever the folder's generation_config.json asks for (sampling, penalties):
        # this checks the graph, not the defaults.
        plain = transformers.GenerationConfig(  # type: ignore[no-untyped-call]
            max_new_tokens=steps, do_sample=False, eos_token_id=eos or None, pad_token_id=eos[0] if eos else 0
        )
        folder_config, lm.torch_model.generation_config = lm.torch_model.generation_config, plain  # not merged in
        try:
            with torch.no_grad():
                expected = lm.torch_model.generate(torch.tensor([prompt]))[0, len(prompt) :].tolist()
        finally:
            lm.torch_model.generation_config = folder_config
        produced = scorer.generate(prompt, steps, set(eos))
        expected = expected[: len(produced)]  # after an end token, generate() pads
        if produced != expected:
            first = next(i for i, (a, b) in enumerate(zip(produced, expected, strict=True)) if a != b)
            raise ConversionError(
                f"greedy generation through the cache leaves transformers' generate() at token {first}"
            )
        return {"positions_compared": positions, "max_abs_error": worst, "greedy_tokens_identical": len(produced)}


def perplexity(nll: np.ndarray) -> float:
    return float(np.exp(nll.mean()))


class LanguageEvaluateStep:
    name = "evaluate"
    description = "Perplexity and decode speed"

    def run(self, ctx: BuildContext, progress: Progress) -> dict[str, Any]:
        lm = ctx.language
        assert lm is not None
        assert lm.record is not None
        assert ctx.model_path is not None
        scorer = Scorer(ctx.model_path, lm.record)
        params: dict[str, Any] = {}
        if ctx.loaded.spec.evaluation is not None:
            lm.nll, lm.greedy = scorer.score(lm.windows)
            reference, _ = _torch_reference(lm.torch_model, lm.windows)
            reference_nll = _nll(reference, lm.windows)
            ctx.metrics["perplexity"] = perplexity(lm.nll)
            ctx.metrics["perplexity_original"] = perplexity(reference_nll)
            params.update(metric="perplexity", direction="minimize", samples=len(lm.windows))
        progress.update(1, 2)
        times = scorer.decode_ms(DECODE_TIMING_STEPS)
        ctx.metrics.update(latency_p50_ms=float(np.percentile(times, 50)),
                           latency_p99_ms=float(np.percentile(times, 99)),
                           size_bytes=float(folder_size(ctx.artifact_dir)))  # fmt: skip
        ctx.metrics["tokens_per_s"] = 1000.0 / ctx.metrics["latency_p50_ms"]
        progress.update(2, 2)
        return {**params, "iterations": DECODE_TIMING_STEPS, "timed": "decode step, batch 1"}


def _nll(logits: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Each window's mean negative log-likelihood of its next tokens, from logits [n, width, vocab]."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_norm = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    rows = np.arange(windows.shape[1] - 1)
    picked = np.stack([logits[i, rows, w[1:]] for i, w in enumerate(windows)])
    return np.asarray((log_norm[:, :-1] - picked).mean(-1))


def check_perplexity(base: np.ndarray, candidate: np.ndarray, optimize: Any) -> MetricCheck:
    """Paired bootstrap over windows of the perplexity increase; its upper bound must fit the budget."""
    base_value, value = perplexity(base), perplexity(candidate)
    rng = np.random.default_rng(0)
    rises = np.empty(optimize.bootstrap)
    for i in range(optimize.bootstrap):
        idx = rng.integers(0, len(base), len(base))
        rises[i] = perplexity(candidate[idx]) - perplexity(base[idx])
    bound = max(float(np.quantile(rises, optimize.confidence)), value - base_value)
    return MetricCheck(value, value - base_value, bound, budget(optimize, base_value))


STEPS = {"quantize_dynamic": transforms.quantize_dynamic, "weight_only": transforms.weight_only}


class LanguageOptimizeStep:
    name = "optimize"
    description = "Compress under a perplexity budget"

    def run(self, ctx: BuildContext, progress: Progress) -> dict[str, Any]:
        lm, optimize = ctx.language, ctx.loaded.spec.optimize
        assert lm is not None
        assert lm.record is not None
        assert lm.nll is not None
        assert lm.greedy is not None
        assert optimize is not None
        assert ctx.model_path is not None
        unoptimized = {k: ctx.metrics[k] for k in ("perplexity", "latency_p50_ms", "size_bytes")}
        # The steps are alternatives (INT8 or 4-bit), each made from the unoptimized model: the one with the
        # lowest cost among those that pass is kept.
        base = ctx.model_path
        base_cost = best_cost = _cost(base, lm.record, optimize.objective)
        best = base
        candidates: list[dict[str, Any]] = []
        applied: list[dict[str, Any]] = []
        for trial, step in enumerate(optimize.steps, start=1):
            candidate = ctx.scratch_dir / f"candidate-{trial}" / MODEL_FILE
            candidate.parent.mkdir(parents=True)
            try:
                record, cost, perplexity_value, agreement, p50 = _trial(step, base, candidate, lm, optimize, base_cost)
            except Exception as exc:  # a transform or ONNX Runtime failing on this model: say why, go on
                reason = f"failed: {exc}" if isinstance(exc, ShipyardError) else f"failed: {explain(step.step, exc)}"
                candidates.append({"trial": trial, "step": step.step, "params": dict(step.params), "fallback": [],
                                   "accepted": False, "reason": reason})  # fmt: skip
                progress.update(trial, len(optimize.steps))
                continue
            if record["accepted"] and cost >= best_cost:
                record.update(
                    accepted=False, reason=f"passes, but an earlier candidate's {optimize.objective} is lower"
                )
            candidates.append({"trial": trial, **record})
            if record["accepted"]:
                best, best_cost = candidate, cost
                applied = [{"step": step.step, "params": record["params"]}]
                ctx.metrics.update(perplexity=perplexity_value, token_agreement=agreement, latency_p50_ms=p50)
            progress.update(trial, len(optimize.steps))
        if best != ctx.model_path:
            ctx.model_path = place_model(best, check_onnx(best, runtime_ops=True), ctx.artifact_dir / MODEL_FILE)
            ctx.metrics["size_bytes"] = float(folder_size(ctx.artifact_dir))
            ctx.metrics["tokens_per_s"] = 1000.0 / ctx.metrics["latency_p50_ms"]
        ctx.metrics.update({f"{k}_unoptimized": v for k, v in unoptimized.items()})
        budget = {k: getattr(optimize, k) for k in ("max_drop", "relative", "confidence", "objective",
                                                    "min_token_agreement")}  # fmt: skip
        return {"candidates": candidates, "applied": applied, "budget": budget, "unoptimized_cost": base_cost}


def _trial(
    step: OptimizeStepSpec, base: Path, candidate: Path, lm: LanguageBuild, optimize: OptimizeSpec, base_cost: float
) -> tuple[dict[str, Any], float, float, float, float]:
    """Make one candidate from the unoptimized model and judge it: (its record, cost, perplexity, token
    agreement, decode p50)."""
    assert lm.record is not None
    assert lm.nll is not None
    assert lm.greedy is not None
    with transforms.quiet_root_logger():
        params = STEPS[step.step](base, candidate, dict(step.params), {})
    scorer = Scorer(candidate, lm.record)  # one session for the perplexity and the decode timing
    nll, greedy = scorer.score(lm.windows)
    check = check_perplexity(lm.nll, nll, optimize)
    agreement = float((greedy == lm.greedy).mean())
    p50 = float(np.percentile(scorer.decode_ms(DECODE_TIMING_STEPS), 50))
    measured = {"latency": p50, "size": float(model_bytes(candidate))}
    if optimize.objective == "memory":
        measured["memory"] = _memory(candidate, lm.record)
    cost = measured[optimize.objective]
    margin = 1 - optimize.min_speedup if optimize.objective == "latency" else 1.0
    reasons = [
        *([] if check.passed else [f"perplexity rise bound {check.drop_bound:.4g} > budget {check.budget:.4g}"]),
        *([] if agreement >= optimize.min_token_agreement else
          [f"greedy tokens agree at {agreement:.1%} < {optimize.min_token_agreement:.0%}"]),
        *([] if cost < base_cost * margin else [f"not {BETTER[optimize.objective]} than the unoptimized model"]),
    ]  # fmt: skip
    record: dict[str, Any] = {
        "step": step.step, "params": params, "fallback": [], "accepted": not reasons, "metric": check.value,
        "drop_bound": check.drop_bound, "token_agreement": agreement, "p50_ms": p50, "size_bytes": measured["size"],
        "memory_bytes": measured.get("memory"), "reason": "; ".join(reasons) or f"{optimize.objective} improved",
    }  # fmt: skip
    return record, cost, check.value, agreement, p50


BETTER = {"latency": "faster", "size": "smaller", "memory": "lighter"}
# Run in a fresh process: the resident memory that loading the model and one decode step of every cache
# slot add to a Python process with onnxruntime imported (VmRSS before and after, from /proc).
_MEMORY_PROBE = """
import sys
from pathlib import Path
import numpy as np
from shipyard.artifact.manifest import GenerationRecord
from shipyard.kvcache import CacheSlots, StepRunner
from shipyard.onnxrt import session
def resident():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024
before = resident()
record = GenerationRecord.model_validate_json(sys.argv[2])
slots = CacheSlots(record, record.max_running, np.dtype(np.float32))
runner = StepRunner(session(sys.argv[1], threads=0), slots, np.dtype(np.int64))
runner.run(0, np.ones((record.max_running, 1), dtype=np.int64), [1] * record.max_running)
print(resident() - before)
"""


def _memory(model: Path, record: GenerationRecord) -> float:
    """Bytes of resident memory the model takes when served (weights, the cache, one step's buffers)."""
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(model), record.model_dump_json()],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise EvaluationError(f"measuring the memory of {model.name} failed: {done.stderr.strip()[-300:]}")
    return float(done.stdout.strip())


def _cost(model: Path, record: GenerationRecord, objective: str) -> float:
    if objective == "size":
        return float(model_bytes(model))
    if objective == "memory":
        return _memory(model, record)
    return float(np.percentile(Scorer(model, record).decode_ms(DECODE_TIMING_STEPS), 50))
