"""Per-caller request rates: a token bucket each, shared by every transport and every worker of the server.

The buckets of `shipyard serve --workers N` live in shared memory the supervisor allocates (SharedBuckets),
so a caller's limit holds for the whole server whichever worker the kernel hands its connections to.
"""

from __future__ import annotations

import hashlib
import multiprocessing.context
import threading
import time
from typing import Any, Protocol

import numpy as np

SHARED_SLOTS = 4096  # callers tracked at once across workers; the least recently seen gives way


class Buckets(Protocol):
    """(tokens, last refill) per caller, updated under `lock`."""

    lock: Any

    def get(self, caller: str) -> tuple[float, float] | None: ...

    def put(self, caller: str, tokens: float, now: float) -> None: ...


class LocalBuckets:
    def __init__(self) -> None:
        self.lock = threading.Lock()  # gRPC and REST share it from different threads
        self._buckets: dict[str, tuple[float, float]] = {}

    def get(self, caller: str) -> tuple[float, float] | None:
        return self._buckets.get(caller)

    def put(self, caller: str, tokens: float, now: float) -> None:
        self._buckets[caller] = (tokens, now)


class SharedBuckets:
    """Buckets in memory shared by the worker processes: an open-addressed table keyed by a stable hash of
    the caller (Python's own hash differs between processes). Make it in the supervisor and hand it to each
    worker as it is spawned; CLOCK_MONOTONIC is the same clock in every process."""

    PROBES = 16

    def __init__(self, context: multiprocessing.context.SpawnContext, slots: int = SHARED_SLOTS) -> None:
        self.lock = context.Lock()
        self._keys = context.RawArray("Q", slots)
        self._values = context.RawArray("d", 2 * slots)  # tokens, last refill

    def _tables(self) -> tuple[np.ndarray, np.ndarray]:
        return np.frombuffer(self._keys, np.uint64), np.frombuffer(self._values, np.float64).reshape(-1, 2)

    @staticmethod
    def _key(caller: str) -> int:
        return int.from_bytes(hashlib.blake2b(caller.encode(), digest_size=8).digest(), "little") | 1  # 0: empty

    def _slot(self, caller: str, claim: bool) -> int | None:
        keys, values = self._tables()
        key = self._key(caller)
        start = key % len(keys)
        probes = [(start + i) % len(keys) for i in range(self.PROBES)]
        for slot in probes:
            if keys[slot] == key:
                return slot
            if keys[slot] == 0:
                break
        if not claim:
            return None
        slot = next((s for s in probes if keys[s] == 0), min(probes, key=lambda s: values[s, 1]))
        keys[slot] = key
        return slot

    def get(self, caller: str) -> tuple[float, float] | None:
        slot = self._slot(caller, claim=False)
        if slot is None:
            return None
        tokens, last = self._tables()[1][slot]
        return float(tokens), float(last)

    def put(self, caller: str, tokens: float, now: float) -> None:
        slot = self._slot(caller, claim=True)
        assert slot is not None
        self._tables()[1][slot] = (tokens, now)


class RateLimiter:
    """A token bucket per caller: `rate` requests per second on average, bursts up to `burst`."""

    def __init__(self, rate: float, burst: int, buckets: Buckets | None = None) -> None:
        self.rate, self.burst = rate, burst
        self._buckets = buckets if buckets is not None else LocalBuckets()

    def allow(self, caller: str) -> bool:
        now = time.monotonic()
        with self._buckets.lock:
            tokens, last = self._buckets.get(caller) or (float(self.burst), now)
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            allowed = tokens >= 1
            self._buckets.put(caller, tokens - 1 if allowed else tokens, now)
            return allowed
