"""The language family: causal language models from a Hugging Face folder or a GGUF file.

load: the folder checked and its model in PyTorch, the held-out text cut into windows. convert: ONNX Runtime
GenAI's builder writes the decoder graph, verified against PyTorch on the windows (logits within tolerance,
greedy tokens identical everywhere) and by a greedy generation equal to transformers' `generate()`.
evaluate: perplexity of both, and the decode step's latency through the serving cache. optimize: the shared
search (optimize/search.py) with the perplexity judge (scoring.py). One Scorer (one ONNX Runtime session)
serves the unoptimized model's verification, evaluation and cost.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from shipyard.artifact.hashing import sha256_file
from shipyard.artifact.layout import folder_size
from shipyard.artifact.manifest import GenerationRecord
from shipyard.errors import ConversionError
from shipyard.onnxrt import MODEL_FILE, check_onnx, parameter_count, place_model, signature_of
from shipyard.pipeline._gguf import check_gguf, gguf_folder
from shipyard.pipeline._hf import (
    HfFolder,
    builder_layout,
    export_decoder,
    generation_record,
    load_torch_model,
    read_folder,
    weights_hash,
)
from shipyard.pipeline.context import BuildContext
from shipyard.pipeline.datasets import text_windows
from shipyard.pipeline.optimize.search import Judge
from shipyard.pipeline.scoring import LanguageJudge, Scorer, Scores, nll_of, perplexity, torch_logits
from shipyard.pipeline.serve_graph import serve_last_position
from shipyard.pipeline.step import ActionStep, Progress, Step
from shipyard.spec.models import GenerationSpec, ToleranceSpec, resolve_path

GREEDY_CHECK_TOKENS = 32  # tokens generated through the cache and compared with transformers' generate()
# Unless the spec sets convert.tolerance: a real 30-layer decoder's FP32 logits on prose differ from PyTorch's
# by ~2e-4 (SmolLM2-135M), past the default atol of 1e-4; greedy tokens must still agree at every position.
LANGUAGE_TOLERANCE = ToleranceSpec(atol=1e-3, rtol=1e-3)
T = TypeVar("T")


def _made(value: T | None) -> T:
    """What an earlier step made (RuntimeError when the steps ran out of order)."""
    if value is None:
        raise RuntimeError("pipeline order: load, convert and evaluate run in that order")
    return value


class LanguageFamily:
    """One language model's build: what its steps share lives here, set by the step that makes it."""

    descriptions: ClassVar[dict[str, str]] = {
        "load": "Load the language model and held-out text",
        "convert": "Export with ONNX Runtime GenAI and verify against PyTorch",
        "evaluate": "Perplexity and decode speed",
        "optimize": "Compress under a perplexity budget",
    }

    def __init__(self) -> None:
        self._loaded: tuple[HfFolder, Any, np.ndarray] | None = None  # folder, PyTorch model, held-out windows
        self._exported: tuple[GenerationRecord, Scorer] | None = None  # the unoptimized model's record and scorer
        self._scored: Scores | None = None  # its held-out scores

    def load(self, ctx: BuildContext, progress: Progress) -> dict[str, Any]:
        spec = ctx.loaded.spec
        source, from_gguf = spec.model, None
        if source.format == "gguf" and source.path is not None:  # read into a plain folder, then built like one
            path = resolve_path(ctx.base_dir, source.path).resolve()
            info = check_gguf(path)
            made = gguf_folder(path, ctx.scratch_dir / "from-gguf")
            source = source.model_copy(update={"format": "huggingface", "path": str(made), "task": "text-generation"})
            from_gguf = info.record(path)
            ctx.source_sha256 = sha256_file(path)
        folder = read_folder(source, ctx.base_dir)
        model = load_torch_model(folder, spec.model.trust_remote_code)
        ctx.source_sha256 = ctx.source_sha256 or weights_hash(folder.path)
        context = int(folder.config.get("max_position_embeddings", 2048))
        if spec.model.generation is not None and spec.model.generation.context is not None:
            context = min(context, spec.model.generation.context)  # windows must fit the served context
        windows = text_windows(spec, int(folder.config.get("vocab_size", 256)), folder.tokenizer_file, ctx.base_dir,
                               context)  # fmt: skip
        self._loaded = (folder, model, windows)
        progress.update(1, 1)
        return {"format": spec.model.format, "task": folder.task, "path": Path(spec.model.path or "").name,
                "architecture": folder.config["model_type"], "parameters": sum(p.numel() for p in model.parameters()),
                "windows": len(windows), "window": int(windows.shape[1]),
                **({"gguf": from_gguf} if from_gguf is not None else {})}  # fmt: skip

    def convert(self, ctx: BuildContext, progress: Progress) -> dict[str, Any]:
        folder, model, windows = _made(self._loaded)
        exported = export_decoder(folder, ctx.scratch_dir / "export")
        progress.update(1, 3)
        graph = check_onnx(exported, runtime_ops=True)
        ctx.model_path = place_model(exported, graph, ctx.artifact_dir / MODEL_FILE)
        ctx.signature = signature_of(graph)
        ctx.metrics["parameters"] = float(parameter_count(graph))
        layout = builder_layout(exported.parent)
        per_slot = 2 * layout["layers"] * layout["kv_heads"] * layout["head_size"] * 4
        record = generation_record(folder, layout, ctx.loaded.spec.model.generation or GenerationSpec(), per_slot)
        shutil.copyfile(folder.tokenizer_file, ctx.artifact_dir / record.tokenizer_file)
        ctx.generation = record
        progress.update(2, 3)
        try:
            scorer = Scorer(ctx.model_path, record)
            convert = ctx.loaded.spec.convert
            tolerance = convert.tolerance if "tolerance" in convert.model_fields_set else LANGUAGE_TOLERANCE
            params = _verify(model, windows, record, scorer, tolerance)
        except RuntimeError as exc:  # onnxruntime's own failures (an operator's unsupported shape, ...)
            reason = str(exc).split("Status Message: ")[-1].strip()
            raise ConversionError(f"ONNX Runtime cannot run the exported decoder: {reason}") from None
        self._exported = (record, scorer)
        ctx.metrics["max_abs_error"] = params["max_abs_error"]
        progress.update(3, 3)
        return {"converter": "onnxruntime-genai model builder", "precision": "fp32", **params, **record.model_dump(
            include={"context", "layers", "kv_heads", "head_size", "max_running"})}  # fmt: skip

    def evaluate(self, ctx: BuildContext, progress: Progress) -> dict[str, Any]:
        _, model, windows = _made(self._loaded)
        _, scorer = _made(self._exported)
        params: dict[str, Any] = {}
        if ctx.loaded.spec.evaluation is not None:
            self._scored = scorer.score(windows)
            ctx.metrics["perplexity"] = perplexity(self._scored.nll)
            ctx.metrics["perplexity_original"] = perplexity(nll_of(torch_logits(model, windows), windows))
            params.update(metric="perplexity", direction="minimize", samples=len(windows))
        progress.update(1, 2)
        times = scorer.decode_ms()
        ctx.metrics.update(latency_p50_ms=float(np.percentile(times, 50)),
                           latency_p99_ms=float(np.percentile(times, 99)),
                           size_bytes=float(folder_size(ctx.artifact_dir)))  # fmt: skip
        ctx.metrics["tokens_per_s"] = 1000.0 / ctx.metrics["latency_p50_ms"]
        progress.update(2, 2)
        return {**params, "iterations": len(times), "timed": "decode step, batch 1"}

    def last_steps(self) -> list[Step]:
        def trim(ctx: BuildContext, progress: Progress) -> dict[str, Any]:
            return serve_last_position(ctx, _made(self._exported)[0], _made(self._loaded)[2][0])

        return [ActionStep("serve graph", "Keep only the logits the server samples from", trim)]

    def judge(self, ctx: BuildContext) -> Judge:
        _, _, windows = _made(self._loaded)
        record, scorer = _made(self._exported)
        scores = _made(self._scored)
        optimize, model_path = ctx.loaded.spec.optimize, ctx.model_path
        if optimize is None or model_path is None:
            raise RuntimeError("pipeline order: optimize runs after convert, with an optimize section")
        return LanguageJudge(optimize, record, windows, scores, scorer, model_path)


def _verify(model: Any, windows: np.ndarray, record: GenerationRecord, scorer: Scorer, tolerance: ToleranceSpec
            ) -> dict[str, Any]:  # fmt: skip
    """Logits and greedy next tokens against PyTorch on the windows, then a greedy generation through the
    cache against transformers' generate()."""
    import torch
    import transformers

    worst, positions = 0.0, 0
    for window in windows[: max(1, 256 // windows.shape[1])]:  # a few hundred positions
        reference = torch_logits(model, window[None, :])[0]
        converted = scorer.logits(window)
        worst = max(worst, float(np.abs(converted - reference).max()))
        if not np.allclose(converted, reference, atol=tolerance.atol, rtol=tolerance.rtol):
            raise ConversionError(f"the ONNX logits differ from PyTorch's by up to {worst:.3g} (atol "
                                  f"{tolerance.atol:g}, rtol {tolerance.rtol:g})")  # fmt: skip
        differ = int((converted.argmax(-1) != reference.argmax(-1)).sum())
        if differ:
            raise ConversionError(f"the ONNX model's greedy next token differs from PyTorch's at {differ} of "
                                  f"{len(window)} positions")  # fmt: skip
        positions += len(window)
    prompt = [int(t) for t in windows[0][:8]]
    steps, eos = min(GREEDY_CHECK_TOKENS, record.context - len(prompt)), record.eos_token_ids
    # Plain greedy decoding, whatever the folder's generation_config.json asks for (sampling, penalties):
    # this checks the graph, not the defaults.
    plain = transformers.GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=steps, do_sample=False, eos_token_id=eos or None, pad_token_id=eos[0] if eos else 0
    )
    folder_config, model.generation_config = model.generation_config, plain  # not merged in
    try:
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]))[0, len(prompt) :].tolist()
    finally:
        model.generation_config = folder_config
    produced = scorer.generate(prompt, steps, set(eos))
    expected = expected[: len(produced)]  # after an end token, generate() pads
    if produced != expected:
        first = next(i for i, (a, b) in enumerate(zip(produced, expected, strict=True)) if a != b)
        raise ConversionError(f"greedy generation through the cache leaves transformers' generate() at token {first}")
    return {"positions_compared": positions, "max_abs_error": worst, "greedy_tokens_identical": len(produced)}
