"""Continuous batching for language models: one scheduler thread per model, one batched graph run per token.

Between decode steps the scheduler admits waiting sequences and retires finished or abandoned ones; every
running sequence then advances by one token in the same run of the graph. A prompt runs in chunks, one
chunk between two decode steps. While sequences are running, a chunk is as many tokens as take about
`prefill_pace` decode steps (both measured as they run), so a new prompt delays the running ones' next
token by about that much, not by its whole prefill.

The key/value cache is preallocated (kvcache.py) and no step copies it. Running sequences occupy slots
0..n-1 so that a batch is one contiguous view of it; a retired sequence's slot is refilled by moving the
last one into it (one sequence's cache, once).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from shipyard.artifact.manifest import GenerationRecord
from shipyard.errors import OverloadedError
from shipyard.kvcache import StepRunner
from shipyard.serve.core.sampling import Sampler
from shipyard.serve.observe.metrics import BATCH_BUCKETS, Histogram

logger = logging.getLogger(__name__)
MIN_CHUNK = 16  # prompt tokens: smaller prefill runs cost more per token than they spare the running ones
PREFIX_BLOCK = 16  # a kept prompt's cache is shared in whole blocks of positions (or whole, if it all matches)
_SMOOTHING = 0.2  # weight of the newest decode-step time in its running average


# What the scheduler thread hands to a sequence's consumer: a token id, or the reason it ended.
# "stop" (an end token), "done" (the grammar of structured output is complete), "length" (max_tokens or the
# context), "timeout", "error", "unloaded"
Finished = str


@dataclass(eq=False)
class Sequence:
    """One request's generation as the scheduler sees it; `events` carries tokens and the end to the consumer."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampler
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # time.monotonic() seconds
    events: asyncio.Queue[int | Finished] = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    cancelled: bool = False  # set by the consumer (client gone, stop string seen); read by the scheduler
    slot: int = -1
    length: int = 0  # positions in the cache
    produced: int = 0
    computed: int = 0  # prompt positions run through the graph (the rest came from the prefix cache)
    last: int = 0  # the newest token, the next step's input


@dataclass
class SchedulerStats:
    """Written by the scheduler thread (`waiting` by `submit` too), read by the metrics collector; each update
    is one store."""

    running: int = 0
    waiting: int = 0
    cache_used: float = 0.0  # positions in use / positions allocated
    step_batch: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))  # sequences per decode step


class Scheduler:
    """The continuous-batching loop of one model, on its own thread."""

    def __init__(self, runner: StepRunner, record: GenerationRecord) -> None:
        self.runner, self.cache = runner, runner.cache
        self.record = record
        self.chunk = record.prefill_chunk  # the most prompt tokens one run takes
        self.stats = SchedulerStats()
        self._step_s: float | None = None  # a decode step's time, averaged
        self._prefilled: tuple[int, float] | None = None  # the latest prefill run of MIN_CHUNK+ tokens: (tokens, s)
        self._waiting: queue.Queue[Sequence] = queue.Queue(maxsize=record.max_waiting)
        self._running: list[Sequence] = []
        self._prefilling: Sequence | None = None
        # prompt token ids → (the same ids as an array, their cache), least recently used first (only this thread
        # touches it)
        self._prompts: OrderedDict[tuple[int, ...], tuple[np.ndarray, list[np.ndarray]]] = OrderedDict()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"scheduler-{id(self):x}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def submit(self, sequence: Sequence) -> None:
        """Queue a sequence; OverloadedError at once when the waiting queue is full."""
        try:
            self._waiting.put_nowait(sequence)
        except queue.Full:
            raise OverloadedError(
                f"{self.record.max_waiting} requests are already waiting for this model: try again shortly"
            ) from None
        self.stats.waiting = self._waiting.qsize()

    # --- the scheduler thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._iterate()
            except Exception:  # the graph failed: end the sequences in it rather than leave their clients waiting
                logger.exception("language model step failed")
                self._end_all("error", waiting=False)
        self._end_all("unloaded", waiting=True)

    def _end_all(self, reason: Finished, waiting: bool) -> None:
        """End the running and prefilling sequences, and with `waiting` the queued ones too, with `reason`."""
        queued = []
        while waiting and not self._waiting.empty():
            queued.append(self._waiting.get_nowait())
        current = [*self._running, *([self._prefilling] if self._prefilling else []), *queued]
        self._deliver([(sequence, reason) for sequence in current])
        self._running, self._prefilling = [], None

    def _iterate(self) -> None:
        if self._prefilling is None and len(self._running) < self.cache.slots:
            idle = not self._running
            try:
                sequence = self._waiting.get(timeout=0.05) if idle else self._waiting.get_nowait()
            except queue.Empty:
                sequence = None
            self.stats.waiting = self._waiting.qsize()
            if sequence is not None and not sequence.cancelled:
                self._admit(sequence)
        if self._prefilling is not None:
            self._prefill_chunk(self._prefilling)
        self._drop_abandoned()
        if self._running:
            self._decode()
        used = sum(s.length for s in self._running)
        self.stats.running, self.stats.cache_used = len(self._running), used / (self.cache.slots * self.cache.context)

    def _drop_abandoned(self) -> None:
        """Retire sequences whose client went away or whose deadline passed (those are told why)."""
        gone = [s for s in self._running if s.cancelled or self._expired(s)]
        if gone:
            self._deliver([(s, "timeout") for s in gone if not s.cancelled])
            self._retire(gone)

    def _expired(self, sequence: Sequence) -> bool:
        return sequence.deadline is not None and time.monotonic() > sequence.deadline

    def _admit(self, sequence: Sequence) -> None:
        sequence.admitted = time.monotonic()
        sequence.slot = len(self._running)
        known, saved = self._cached_prefix(sequence.prompt)
        if saved is not None:
            self.cache.restore(sequence.slot, saved, known)
        sequence.length = known
        self._prefilling = sequence

    def _cached_prefix(self, prompt: list[int]) -> tuple[int, list[np.ndarray] | None]:
        """How many leading positions of this prompt a kept one covers, and that prompt's cache: all of a kept
        prompt this one extends (an earlier turn of the conversation), else the whole blocks of positions they
        share (a system prompt). The last position always runs again: its logits pick the first token."""
        ids = np.asarray(prompt)
        best, shared = None, 0
        for key, (kept, _) in self._prompts.items():
            width = min(len(kept), len(ids))
            differ = np.flatnonzero(kept[:width] != ids[:width])
            common = int(differ[0]) if len(differ) else width
            if common < len(kept):
                common -= common % PREFIX_BLOCK
            if common > shared:
                best, shared = key, common
        if best is None:
            return 0, None
        self._prompts.move_to_end(best)
        return min(shared, len(prompt) - 1), self._prompts[best][1]

    def _prefill_chunk(self, sequence: Sequence) -> None:
        if sequence.cancelled or self._expired(sequence):
            self._prefilling = None
            self._deliver([(sequence, "timeout")] if not sequence.cancelled else [])
            return
        start = sequence.length
        piece = sequence.prompt[start : start + self._chunk_size()]
        began = time.perf_counter()
        logits = self.runner.run(sequence.slot, np.asarray([piece]), [start + len(piece)])
        if len(piece) >= MIN_CHUNK:
            self._prefilled = (len(piece), max(time.perf_counter() - began, 1e-6))
        sequence.length += len(piece)
        sequence.computed += len(piece)
        if sequence.length < len(sequence.prompt):
            return  # the next chunk runs after the next decode step
        self._prefilling = None
        self._remember(sequence)
        self._running.append(sequence)
        self._advance([(sequence, logits[0])])

    def _chunk_size(self) -> int:
        """Prompt tokens to run before the next decode step: the whole chunk while nothing runs (no one
        waits), else as many as take about `prefill_pace` decode steps."""
        pace = self.record.prefill_pace
        if not pace or not self._running or self._step_s is None or self._prefilled is None:
            return self.chunk
        # The latest run's size scaled by how far its time was from the target: with a run's cost a + b * tokens
        # this converges to the size that takes the target (a stable fixed point), whatever the fixed cost a.
        tokens, took = self._prefilled
        return max(MIN_CHUNK, min(self.chunk, int(tokens * pace * self._step_s / took)))

    def _remember(self, sequence: Sequence) -> None:
        if self.record.prefix_cache == 0 or len(sequence.prompt) < 2:
            return
        key = tuple(sequence.prompt)
        self._prompts[key] = (np.asarray(sequence.prompt), self.cache.save(sequence.slot, sequence.length))
        self._prompts.move_to_end(key)
        while len(self._prompts) > self.record.prefix_cache:
            self._prompts.popitem(last=False)

    def _decode(self) -> None:
        running = self._running
        ids = np.asarray([[s.last] for s in running])
        began = time.perf_counter()
        logits = self.runner.run(0, ids, [s.length + 1 for s in running])
        self._step_s = _averaged(self._step_s, time.perf_counter() - began)
        for sequence in running:
            sequence.length += 1
        self.stats.step_batch.observe(len(running))
        self._advance(list(zip(running, logits, strict=True)))

    def _advance(self, rows: list[tuple[Sequence, np.ndarray]]) -> None:
        """Pick each row's next token, hand it over, and retire the sequences that are done."""
        events: list[tuple[Sequence, int | Finished]] = []
        done = []
        for sequence, logits in rows:
            if sequence.sampling.finished:  # a grammar that takes nothing at all (or failed at once)
                events.append((sequence, "done"))
                done.append(sequence)
                continue
            token = sequence.sampling.pick(logits)
            if token in sequence.sampling.ends:
                events.append((sequence, "stop"))
                done.append(sequence)
                continue
            sequence.last = token
            sequence.produced += 1
            events.append((sequence, token))
            if sequence.sampling.finished:  # structured output that is complete: no step runs for nothing
                events.append((sequence, "done"))
                done.append(sequence)
            elif sequence.produced >= sequence.max_tokens or sequence.length >= self.cache.context:
                events.append((sequence, "length"))
                done.append(sequence)
        self._deliver(events)
        self._retire(done)

    def _retire(self, sequences: list[Sequence]) -> None:
        """Free their slots, keeping the running ones in slots 0..n-1 (and the prefilling one next)."""
        for sequence in sorted(sequences, key=lambda s: s.slot, reverse=True):
            last = self._running.pop()
            if last is not sequence:  # the highest slot moves into the freed one
                self.cache.move(last.slot, sequence.slot, last.length)
                last.slot = sequence.slot
                self._running[sequence.slot] = last
        if self._prefilling is not None:
            self._move_prefilling(len(self._running))

    def _move_prefilling(self, slot: int) -> None:
        sequence = self._prefilling
        assert sequence is not None
        if sequence.slot != slot:
            self.cache.move(sequence.slot, slot, sequence.length)
            sequence.slot = slot

    @staticmethod
    def _deliver(events: list[tuple[Sequence, int | Finished]]) -> None:
        """Hand tokens and ends to the sequences' event loops: one wake-up per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, int | Finished]]] = {}
        for sequence, event in events:
            by_loop.setdefault(sequence.loop, []).append((sequence, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                continue


def _averaged(average: float | None, value: float) -> float:
    return value if average is None else average + _SMOOTHING * (value - average)


def _put_all(items: list[tuple[Sequence, int | Finished]]) -> None:
    for sequence, event in items:
        sequence.events.put_nowait(event)
