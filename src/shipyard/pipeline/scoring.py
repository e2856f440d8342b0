"""Scoring an exported decoder through the cache layout the server uses: perplexity and greedy tokens on
held-out windows, decode-step speed, the memory it takes when served, and the language family's judge.

A candidate passes when its perplexity stays within budget (a paired bootstrap bound over the windows), its
greedy tokens agree with the unoptimized model's often enough, and it improves the spec's objective (decode
latency, size, or the resident memory a fresh process needs to serve it); of those, the cheapest is kept.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shipyard.artifact.layout import folder_size
from shipyard.artifact.manifest import GenerationRecord
from shipyard.dtypes import numpy_of
from shipyard.errors import EvaluationError
from shipyard.kvcache import CacheSlots, StepRunner
from shipyard.onnxrt import MODEL_FILE, TensorrtRun, check_onnx, model_bytes, place_model, session, signature_of
from shipyard.pipeline.context import BuildContext, EvalData
from shipyard.pipeline.optimize.candidate import Candidate
from shipyard.pipeline.optimize.guard import MetricCheck, budget
from shipyard.spec.models import OptimizeSpec

DECODE_TIMING_STEPS = 64
BETTER = {"latency": "faster", "size": "smaller", "memory": "lighter"}
# A position's greedy token counts for agreement only where the unoptimized model has decided: its top token
# at least twice as likely as the runner-up. Where the top two are nearly tied (every position of a
# random-initialised model, whose logits are flat), which one a rounding error picks says nothing of quality.
CLEAR_MARGIN = float(np.log(2))


@dataclass(frozen=True)
class Scores:
    """A model on held-out windows: per-window mean NLL [n], greedy next tokens and where it is decided [n, width]."""

    nll: np.ndarray
    greedy: np.ndarray
    clear: np.ndarray  # top-1 logit at least CLEAR_MARGIN above the runner-up

    def agreement(self, other: Scores) -> float | None:
        """The share of this model's decided positions where `other` picks the same token (None: none decided)."""
        if not self.clear.any():
            return None
        return float((other.greedy == self.greedy)[self.clear].mean())


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

    def score(self, windows: np.ndarray) -> Scores:
        """Per-window mean negative log-likelihood of the next token, and the greedy next token everywhere."""
        nll, greedy, clear = [], [], []
        for window in windows:
            logits = self.logits(window)
            nll.append(float(nll_of(logits[None], window[None])[0]))
            greedy.append(logits.argmax(-1))
            top2 = np.partition(logits, -2, axis=-1)[:, -2:]
            clear.append(top2[:, 1] - top2[:, 0] >= CLEAR_MARGIN)
        return Scores(np.asarray(nll), np.asarray(greedy), np.asarray(clear))

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

    def decode_ms(self, steps: int = DECODE_TIMING_STEPS) -> list[float]:
        """Decode-step times at batch 1, halfway into the context."""
        total = min(self.cache.context // 2, 128)
        self.runner.run(0, np.ones((1, total), dtype=np.int64), [total])
        times = []
        for i in range(steps):
            start = time.perf_counter()
            self.runner.run(0, np.ones((1, 1), dtype=np.int64), [total + 1 + i % 8])
            times.append((time.perf_counter() - start) * 1e3)
        return times


def torch_logits(model: Any, windows: np.ndarray) -> np.ndarray:
    """PyTorch's logits of windows [n, width] (the reference the exported graph is checked against)."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(windows)).logits.float().numpy()  # type: ignore[no-any-return]


def nll_of(logits: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Each window's mean negative log-likelihood of its next tokens, from logits [n, width, vocab]."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_norm = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    rows = np.arange(windows.shape[1] - 1)
    picked = np.stack([logits[i, rows, w[1:]] for i, w in enumerate(windows)])
    return np.asarray((log_norm[:, :-1] - picked).mean(-1))


def perplexity(nll: np.ndarray) -> float:
    return float(np.exp(nll.mean()))


def check_perplexity(base: np.ndarray, candidate: np.ndarray, optimize: OptimizeSpec) -> MetricCheck:
    """Paired bootstrap over windows of the perplexity increase; its upper bound must fit the budget."""
    base_value, value = perplexity(base), perplexity(candidate)
    rng = np.random.default_rng(0)
    rises = np.empty(optimize.bootstrap)
    for i in range(optimize.bootstrap):
        idx = rng.integers(0, len(base), len(base))
        rises[i] = perplexity(candidate[idx]) - perplexity(base[idx])
    bound = max(float(np.quantile(rises, optimize.confidence)), value - base_value)
    return MetricCheck(value, value - base_value, bound, budget(optimize, base_value))


# Run in a fresh process: the resident memory that loading the model and one decode step of every cache
# slot add to a Python process with onnxruntime imported (VmRSS before and after, from /proc). The cache and
# the ids take the graph's own element types.
_MEMORY_PROBE = """
import sys
from pathlib import Path
import numpy as np
from shipyard.artifact.manifest import GenerationRecord
from shipyard.dtypes import numpy_of
from shipyard.kvcache import CacheSlots, StepRunner
from shipyard.onnxrt import check_onnx, session, signature_of
def resident():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024
before = resident()
record = GenerationRecord.model_validate_json(sys.argv[2])
inputs = {t.name: t for t in signature_of(check_onnx(Path(sys.argv[1]), runtime_ops=True)).inputs}
ids = numpy_of(inputs["input_ids"].dtype)
slots = CacheSlots(record, record.max_running, numpy_of(inputs[record.past_key % 0].dtype))
runner = StepRunner(session(sys.argv[1], threads=0), slots, ids)
runner.run(0, np.ones((record.max_running, 1), dtype=ids), [1] * record.max_running)
print(resident() - before)
"""


def served_memory(model: Path, record: GenerationRecord) -> float:
    """Bytes of resident memory the model takes when served (weights, the cache, one step's buffers)."""
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(model), record.model_dump_json()],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise EvaluationError(f"measuring the memory of {model.name} failed: {done.stderr.strip()[-300:]}")
    return float(done.stdout.strip())


class LanguageJudge:
    """Alternatives (each candidate made from the unoptimized model), judged on held-out perplexity, greedy
    agreement and the spec's objective."""

    chained = False
    fallback = False
    runtime_ops = True
    train: EvalData | None = None  # the language steps learn nothing

    def __init__(self, optimize: OptimizeSpec, record: GenerationRecord, windows: np.ndarray, scores: Scores,
                 base: Scorer, base_model: Path) -> None:  # fmt: skip
        self.optimize, self.record, self.windows, self.scores = optimize, record, windows, scores
        self.calibration: dict[str, np.ndarray] = {}  # its steps (weight-only, dynamic INT8) calibrate on nothing
        timed = {"latency": lambda: float(np.percentile(base.decode_ms(), 50)),
                 "size": lambda: float(model_bytes(base_model)),
                 "memory": lambda: served_memory(base_model, record)}  # fmt: skip
        self.base_cost = self.best_cost = timed[optimize.objective]()
        self.kept: dict[str, float] = {}  # the winner's figures

    def judge(self, candidate: Candidate, model: Path, best: Path, tensorrt: TensorrtRun | None = None) -> None:
        optimize = self.optimize
        scorer = Scorer(model, self.record)  # one session for the perplexity and the decode timing
        scores = scorer.score(self.windows)
        check = check_perplexity(self.scores.nll, scores.nll, optimize)
        agreement = self.scores.agreement(scores)  # None: the unoptimized model decides no position
        p50 = float(np.percentile(scorer.decode_ms(), 50))
        measured = {"latency": p50, "size": float(model_bytes(model))}
        if optimize.objective == "memory":
            measured["memory"] = served_memory(model, self.record)
        cost = measured[optimize.objective]
        margin = 1 - optimize.min_speedup if optimize.objective == "latency" else 1.0
        quality = [
            *([] if check.passed else [f"perplexity rise bound {check.drop_bound:.4g} > budget {check.budget:.4g}"]),
            *([] if agreement is None or agreement >= optimize.min_token_agreement else
              [f"greedy tokens agree at {agreement:.1%} of decided positions < {optimize.min_token_agreement:.0%}"]),
        ]  # fmt: skip
        better = BETTER[optimize.objective]
        cheaper = [] if cost < self.base_cost * margin else [f"not {better} than the unoptimized model"]
        candidate.metric, candidate.drop_bound, candidate.token_agreement = check.value, check.drop_bound, agreement
        candidate.p50_ms, candidate.memory_bytes = p50, measured.get("memory")
        candidate.failed_guard = "metric" if quality else "speed" if cheaper else None
        candidate.accepted = not quality and not cheaper
        candidate.reason = "; ".join([*quality, *cheaper]) or f"{optimize.objective} improved"
        if candidate.accepted and cost >= self.best_cost:
            candidate.accepted, candidate.failed_guard = False, "speed"
            candidate.reason = f"passes, but an earlier candidate's {optimize.objective} is lower"
        if candidate.accepted:
            self.best_cost = cost
            self.kept = {"perplexity": check.value, "latency_p50_ms": p50,
                         **({"token_agreement": agreement} if agreement is not None else {})}  # fmt: skip

    def finish(self, ctx: BuildContext, winner: Candidate | None, best: Path, work: Path) -> dict[str, Any]:
        unoptimized = {k: ctx.metrics[k] for k in ("perplexity", "latency_p50_ms", "size_bytes")}
        if winner is not None:
            ctx.model_path = place_model(best, check_onnx(best, runtime_ops=True), ctx.artifact_dir / MODEL_FILE)
            ctx.metrics.update(self.kept, size_bytes=float(folder_size(ctx.artifact_dir)))
            ctx.metrics["tokens_per_s"] = 1000.0 / ctx.metrics["latency_p50_ms"]
        ctx.metrics.update({f"{k}_unoptimized": v for k, v in unoptimized.items()})
        optimize = self.optimize
        budget = {k: getattr(optimize, k) for k in ("max_drop", "relative", "confidence", "objective",
                                                    "min_token_agreement")}  # fmt: skip
        decided = float(self.scores.clear.mean())  # the share of positions the agreement guard counts
        return {"budget": {**budget, "decided_positions": decided}, "unoptimized_cost": self.base_cost}
