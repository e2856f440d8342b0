"""Replay logged traffic against a candidate version before promoting it.

Every logged request (redacted ones carry no values and are skipped) runs through the candidate in
process; its outputs are compared with what the served version answered: the same predicted class
for class scores, values within tolerance otherwise. The report gives agreement, the largest
difference, and the candidate's latency next to the logged server-side latency.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shipyard.artifact.encryption import model_source
from shipyard.errors import FailedCheckError, InvalidInputError
from shipyard.onnxrt import session
from shipyard.registry.local import LocalRegistry
from shipyard.tokenizer import artifact_encoder


@dataclass(frozen=True)
class ReplayReport:
    candidate: str
    requests: int
    skipped: int
    agreement: float
    max_abs_diff: float
    candidate_p50_ms: float
    logged_p50_ms: float
    served_versions: list[str]


def _array(tensor: dict[str, Any]) -> np.ndarray:
    # Text was logged as str, which is what ONNX Runtime takes and returns for string tensors.
    return np.asarray(tensor["data"], dtype=str(tensor["dtype"])).reshape([int(d) for d in tensor["shape"]])


def _agree(logged: np.ndarray, new: np.ndarray) -> tuple[bool, float]:
    if logged.dtype.kind != "f":
        return bool(np.array_equal(logged, new)), 0.0
    diff = float(np.max(np.abs(logged - new))) if logged.size else 0.0
    flat_old, flat_new = logged.reshape(len(logged), -1), new.reshape(len(new), -1)
    if flat_old.shape[1] > 1:  # class scores: the decision is what matters
        return bool(np.array_equal(flat_old.argmax(1), flat_new.argmax(1))), diff
    return bool(np.allclose(logged, new, rtol=1e-3, atol=1e-5)), diff


def replay(logs: list[Path], registry: LocalRegistry, ref: str, encryption_key: bytes | None = None) -> ReplayReport:
    """Run the logged requests of the candidate's model name through the candidate and compare."""
    record = registry.resolve(ref)
    manifest = registry.manifest(record, verify=True)
    source = model_source(registry.path(record), manifest, encryption_key)
    sess = session(source.model, side_files=source.side_files)
    text = artifact_encoder(registry.path(record), manifest)
    agreed = compared = skipped = 0
    worst, times, logged_ms, served = 0.0, [], [], set()
    for log in logs:
        for line in log.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                raise InvalidInputError(f"{log}: not a shipyard request log (bad JSON line)") from None
            if entry.get("model") != record.name:
                continue
            if entry.get("redacted"):
                skipped += 1
                continue
            feeds = {name: _array(t) for name, t in entry["inputs"].items()}
            if text is not None:
                feeds = text.apply(feeds)
            start = time.perf_counter()
            outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
            times.append((time.perf_counter() - start) * 1e3)
            logged_ms.append(float(entry["latency_ms"]))
            served.add(str(entry["version"]))
            verdicts = [_agree(_array(t), outputs[name]) for name, t in entry["outputs"].items()]
            agreed += all(ok for ok, _ in verdicts)
            worst = max([worst, *(d for _, d in verdicts)])
            compared += 1
    if compared == 0:
        raise InvalidInputError(f"no replayable requests for {record.name} in the logs ({skipped} redacted)")
    return ReplayReport(record.ref, compared, skipped, agreed / compared, worst, statistics.median(times),
                        statistics.median(logged_ms), sorted(served))  # fmt: skip


def require_agreement(report: ReplayReport, min_agreement: float) -> None:
    if report.agreement < min_agreement:
        raise FailedCheckError(
            f"{report.candidate} agrees with the served answers on {report.agreement:.1%} of {report.requests} "
            f"logged requests (needs {min_agreement:.1%}); largest difference {report.max_abs_diff:.4g}"
        )
