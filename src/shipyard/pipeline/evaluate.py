"""Evaluate step: quality of original vs ONNX, size, parameters, in-process latency and throughput."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from shipyard.artifact.layout import folder_size
from shipyard.artifact.reference import build_reference, write_reference
from shipyard.errors import EvaluationError
from shipyard.onnxrt import is_batchable, ort_predict, random_feeds, run_in_chunks, session
from shipyard.pipeline import metrics
from shipyard.pipeline.context import BuildContext, EvalData
from shipyard.pipeline.load import release
from shipyard.pipeline.step import Progress
from shipyard.pipeline.text import sample_feeds
from shipyard.spec.models import EvaluationSpec, LatencySpec, SignatureSpec

_WARMUP = 10
_THROUGHPUT_SECONDS = 0.5


def output_index(evaluation: EvaluationSpec, signature: SignatureSpec) -> int:
    names = [t.name for t in signature.outputs]
    if evaluation.output is None:
        return 0
    if evaluation.output not in names:
        raise EvaluationError(f"evaluation.output {evaluation.output!r} is not a model output ({', '.join(names)})")
    return names.index(evaluation.output)


def timing_feeds(signature: SignatureSpec, data: EvalData | None, batch: int) -> dict[str, np.ndarray]:
    """Evaluation samples when there are enough (real shapes, e.g. sequence lengths), else random inputs."""
    if data is not None and len(data) >= batch:
        return data.head(batch)
    return random_feeds(signature, batch=batch, seed=batch)


def measure_latency(
    run: Any, signature: SignatureSpec, spec: LatencySpec, progress: Progress, data: EvalData | None = None
) -> dict[str, float]:
    """p50/p99 of batch-1 runs and samples/s at `throughput_batch`, timed with perf_counter."""
    single = timing_feeds(signature, data, 1)
    for _ in range(_WARMUP):
        run(single)
    times = np.empty(spec.iterations)
    for i in range(spec.iterations):
        start = time.perf_counter()
        run(single)
        times[i] = time.perf_counter() - start
        if i % 50 == 0:
            progress.update(i, spec.iterations + 1)
    result = {
        "latency_p50_ms": float(np.percentile(times, 50) * 1e3),
        "latency_p99_ms": float(np.percentile(times, 99) * 1e3),
    }
    batch = spec.throughput_batch if is_batchable(signature) else 1
    feeds = timing_feeds(signature, data, batch)
    run(feeds)
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < _THROUGHPUT_SECONDS or runs < 3:
        run(feeds)
        runs += 1
    result["throughput_batch"] = float(batch)
    result["throughput_sps"] = runs * batch / elapsed
    progress.update(spec.iterations + 1, spec.iterations + 1)
    return result


def evaluate(ctx: BuildContext, progress: Progress) -> dict[str, Any]:
    """The tensor family's evaluate: the metric on both models, drift references, latency and throughput."""
    model_path, signature = ctx.require_model()
    evaluation = ctx.loaded.spec.evaluation
    latency = evaluation.latency if evaluation is not None else LatencySpec()
    original = None
    if evaluation is not None and ctx.eval_data is not None and ctx.source is not None:
        original = run_in_chunks(ctx.source.predict, ctx.eval_data.inputs, signature)[
            output_index(evaluation, signature)
        ]
        release(ctx.source)  # before the converted model's session: not two copies of the weights at once
    # Timed where it will be served: the spec's device's providers, those this machine has (else the CPU).
    sess = session(model_path, threads=latency.threads, preferred=ctx.loaded.spec.serve.providers())
    params: dict[str, Any] = {"threads": latency.threads, "provider": sess.get_providers()[0]}
    if evaluation is not None and ctx.eval_data is not None and original is not None:
        index = output_index(evaluation, signature)
        feeds, target = ctx.eval_data.inputs, ctx.eval_data.target
        converted = run_in_chunks(ort_predict(sess), feeds, signature)[index]
        name = evaluation.metric.name
        ctx.metrics[name] = metrics.compute(evaluation.metric, converted, target)
        ctx.metrics[f"{name}_original"] = metrics.compute(evaluation.metric, np.asarray(original), target)
        # What live traffic is compared with (input and prediction drift) when the model is served.
        # Token ids are not features: a text model's reference keeps its predictions only. (A language model,
        # another family, gets none: clients see text, not the logits its evaluation scores.)
        tokens = ctx.text.record.feeds if ctx.text is not None else []
        watched = {k: v for k, v in feeds.items() if k not in tokens}
        write_reference(ctx.artifact_dir, build_reference(watched, converted, signature.outputs[index].name))
        params.update(metric=name, direction=evaluation.metric.better, samples=len(target))
    ctx.metrics["size_bytes"] = float(folder_size(ctx.artifact_dir))
    if all(t.dtype != "string" for t in signature.inputs):
        timed = ctx.eval_data
        if timed is None and ctx.text is not None:  # token ids from the tokenizer, not random ones
            feeds = sample_feeds(ctx.text, max(latency.throughput_batch, 1))
            timed = EvalData(feeds, np.zeros(latency.throughput_batch))
        ctx.metrics.update(measure_latency(lambda f: sess.run(None, f), signature, latency, progress, timed))
        params.update(iterations=latency.iterations)
    return params
