"""Sampled request/response logging as JSON lines, size-rotated, for audits and `shipyard replay`.

Each record holds the model and version, the request id, the server-side latency and the tensors
(datatype, shape, data). With redaction, tensors keep their shape, datatype and a sha256 of their
bytes, and no values. Files rotate with logging's RotatingFileHandler (requests.jsonl, .1, .2, ...); each worker
process of a server with several writes its own (requests-0.jsonl, requests-1.jsonl, ...).
"""

from __future__ import annotations

import hashlib
import logging
import logging.handlers
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

QUEUE = 1024  # records waiting to be written; more are dropped (and counted) rather than held


def _tensor(array: np.ndarray, redact: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"dtype": str(array.dtype), "shape": list(array.shape)}
    if redact:
        out["sha256"] = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
    elif array.dtype == object:
        out["data"] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.ravel()]
    else:
        out["data"] = array.ravel().tolist()
    return out


class RequestLog:
    def __init__(
        self, folder: Path, sample: float, max_bytes: int = 10 << 20, backups: int = 5, redact: bool = False,
        file_name: str = "requests.jsonl",
    ) -> None:  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        self.sample, self.redact = sample, redact
        self._rng = random.Random()
        self._logger = logging.getLogger(f"shipyard.requests.{id(self)}")
        self._logger.propagate = False  # records go to the file only, never to the server log
        self._logger.setLevel(logging.INFO)
        handler = logging.handlers.RotatingFileHandler(folder / file_name, maxBytes=max_bytes,
                                                       backupCount=backups, encoding="utf-8")  # fmt: skip
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._handler = handler
        self._logger.addHandler(handler)
        # Writing (and turning tensors into JSON, which costs what they are big) happens on a thread of its
        # own: the event loop only hands the record over. A full queue drops records and counts them.
        self._queue: queue.Queue[_Record | None] = queue.Queue(maxsize=QUEUE)
        self.dropped = 0
        self._writer = threading.Thread(target=self._write, name="request-log", daemon=True)
        self._writer.start()

    def record(self, name: str, version: int, request_id: str | None, latency_ms: float,
               inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:  # fmt: skip
        if self._rng.random() >= self.sample:
            return
        try:
            self._queue.put_nowait(_Record(time.time(), name, version, request_id, latency_ms, inputs, outputs))
        except queue.Full:
            self.dropped += 1

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            entry = {
                "ts": round(item.ts, 6),
                "model": item.name,
                "version": item.version,
                "id": item.request_id,
                "latency_ms": round(item.latency_ms, 4),
                "redacted": self.redact,
                "inputs": {k: _tensor(v, self.redact) for k, v in item.inputs.items()},
                "outputs": {k: _tensor(v, self.redact) for k, v in item.outputs.items()},
            }
            self._logger.info(orjson.dumps(entry).decode())

    def close(self) -> None:
        """Write what is queued, then close the file."""
        self._queue.put(None)
        self._writer.join()
        self._logger.removeHandler(self._handler)
        self._handler.close()


@dataclass(frozen=True)
class _Record:
    ts: float
    name: str
    version: int
    request_id: str | None
    latency_ms: float
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
