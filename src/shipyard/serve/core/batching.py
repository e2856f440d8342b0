"""The bounded adaptive batcher: one per loaded model version.

A request that finds an idle model instance runs at once (no added wait). While every instance
is busy, requests gather in a bounded queue; the next free instance takes as many as fit
`max_batch_size` (optionally waiting up to `max_queue_delay` to reach a preferred size, but only
under load). A full queue refuses new requests immediately instead of growing without end.

Models fast enough (see `use_inline`) run on the event-loop thread instead of a worker thread:
a thread hop costs 0.1-0.3 ms on small VMs, more than such a model's whole batch. Then the
batching window is one event-loop turn: every request decoded in that turn joins the batch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from shipyard.errors import InvalidInputError, OverloadedError, ShipyardError
from shipyard.serve.observe.stats import ModelStats

logger = logging.getLogger(__name__)
RunFn = Callable[[dict[str, np.ndarray]], Awaitable[list[np.ndarray]]]
InlineFn = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


@dataclass(slots=True)
class _Pending:
    feeds: dict[str, np.ndarray]
    size: int  # samples (the batch dimension of every input)
    key: tuple[object, ...]  # requests batch together only when their non-batch shapes agree
    future: asyncio.Future[list[np.ndarray]]
    enqueued_ns: int


class Batcher:
    """Queue → batch → run on a free instance → split results back to each request."""

    def __init__(
        self,
        run: RunFn,
        stats: ModelStats,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        preferred_sizes: list[int],
        max_queue_size: int,
        instances: int,
    ) -> None:
        self._run = run
        self._stats = stats
        self.max_batch_size = max_batch_size
        self._delay = max_queue_delay_s
        self._preferred = sorted(preferred_sizes)
        self._max_queue = max_queue_size
        self._queue: collections.deque[_Pending] = collections.deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(instances)
        self._busy = 0  # batches running now
        self._in_flight: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self._inline: InlineFn | None = None
        self._flush_pending: asyncio.Handle | None = None
        self._under_load = False  # the last inline flush ran more than one request

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1

    @property
    def inline(self) -> bool:
        return self._inline is not None

    def use_inline(self, run: InlineFn) -> None:
        """Run batches synchronously on the event loop with `run` (call before start)."""
        self._inline = run

    def start(self) -> None:
        if self._inline is None:
            self._loop_task = asyncio.create_task(self._dispatch_loop(), name="batcher")

    async def submit(self, feeds: dict[str, np.ndarray], size: int) -> list[np.ndarray]:
        """Queue one request and wait for its outputs; OverloadedError when the queue is full."""
        if self._closing:
            raise OverloadedError("model is being unloaded")
        if len(self._queue) >= self._max_queue:
            raise OverloadedError(f"queue is full ({self._max_queue} requests waiting); retry later")
        if self.batching and size > self.max_batch_size:
            raise InvalidInputError(f"batch of {size} exceeds the model's max_batch_size {self.max_batch_size}")
        key = tuple((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items())
        future: asyncio.Future[list[np.ndarray]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(feeds, size, key, future, time.perf_counter_ns()))
        self._stats.queue_depth(len(self._queue))
        if self._inline is None:
            self._arrived.set()
        elif self._flush_pending is None:
            # After the handlers already runnable in this turn have queued their requests too.
            self._flush_pending = asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _take(self) -> list[_Pending]:
        first = self._queue.popleft()
        batch, total = [first], first.size
        if not self.batching:
            return batch
        skipped: list[_Pending] = []
        while self._queue and total < self.max_batch_size:
            item = self._queue.popleft()
            if item.key == first.key and total + item.size <= self.max_batch_size:
                batch.append(item)
                total += item.size
            else:
                skipped.append(item)
        self._queue.extendleft(reversed(skipped))
        return batch

    def _trim_to_preferred(self, batch: list[_Pending]) -> list[_Pending]:
        total = sum(p.size for p in batch)
        fitting = [s for s in self._preferred if s <= total]
        if not fitting or total in self._preferred:
            return batch
        kept, count = [], 0
        for item in batch:
            if count + item.size > fitting[-1]:
                break
            kept.append(item)
            count += item.size
        if not kept:
            return batch
        self._queue.extendleft(reversed(batch[len(kept) :]))
        return kept

    async def _wait_for_more(self, batch: list[_Pending]) -> list[_Pending]:
        # Only under load: a lone request with nothing else in flight never waits.
        deadline = batch[0].enqueued_ns + int(self._delay * 1e9)
        target = next((s for s in self._preferred if s > sum(p.size for p in batch)), self.max_batch_size)
        while sum(p.size for p in batch) < target:
            remaining = (deadline - time.perf_counter_ns()) / 1e9
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
            self._queue.extendleft(reversed(batch))
            batch = self._take()
        return batch

    async def _dispatch_loop(self) -> None:
        while True:
            await self._slots.acquire()
            while not self._queue:
                if self._closing:
                    self._slots.release()
                    return
                self._arrived.clear()
                await self._arrived.wait()
            batch = self._take()
            if self._delay > 0 and self.batching and (len(batch) > 1 or self._busy > 0):
                batch = await self._wait_for_more(batch)
            if self._preferred and self.batching:
                batch = self._trim_to_preferred(batch)
            self._stats.queue_depth(len(self._queue))
            self._busy += 1
            task = asyncio.create_task(self._execute(batch))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    def _flush(self) -> None:
        """Inline mode: run everything queued now, in batches, on the event-loop thread."""
        self._flush_pending = None
        while self._queue:
            if self._delay > 0 and self.batching and self._under_load and not self._closing:
                queued = sum(p.size for p in self._queue)
                target = next((s for s in self._preferred if s > queued), self.max_batch_size)
                remaining = self._queue[0].enqueued_ns + int(self._delay * 1e9) - time.perf_counter_ns()
                if queued < target and remaining > 0:
                    self._flush_pending = asyncio.get_running_loop().call_later(remaining / 1e9, self._flush)
                    return
            batch = self._take()
            if self._preferred and self.batching:
                batch = self._trim_to_preferred(batch)
            self._under_load = len(batch) > 1
            self._stats.queue_depth(len(self._queue))
            start, feeds = self._assemble(batch)
            assembled = time.perf_counter_ns()
            assert self._inline is not None
            try:
                outputs = self._inline(feeds)
            except Exception as exc:
                self._fail_with(batch, exc)
                continue
            self._finish(batch, outputs, start, assembled)

    def _assemble(self, batch: list[_Pending]) -> tuple[int, dict[str, np.ndarray]]:
        start = time.perf_counter_ns()
        for item in batch:
            self._stats.queued(start - item.enqueued_ns)
        if len(batch) == 1:
            return start, batch[0].feeds
        return start, {name: np.concatenate([p.feeds[name] for p in batch]) for name in batch[0].feeds}

    def _finish(self, batch: list[_Pending], outputs: list[np.ndarray], start: int, assembled: int) -> None:
        ran = time.perf_counter_ns()
        total = sum(p.size for p in batch)
        self._split(batch, outputs, total)
        self._stats.batch_done(total, assembled - start, ran - assembled, time.perf_counter_ns() - ran)

    def _fail_with(self, batch: list[_Pending], exc: Exception) -> None:
        if isinstance(exc, ShipyardError):
            self._fail(batch, exc)
        else:  # the runtime's own errors: logged here, reported without internals
            logger.error("inference failed", exc_info=exc)
            self._fail(batch, ShipyardError("inference failed (see the server log)"))

    async def _execute(self, batch: list[_Pending]) -> None:
        try:
            start, feeds = self._assemble(batch)
            assembled = time.perf_counter_ns()
            try:
                outputs = await self._run(feeds)
            except Exception as exc:
                self._fail_with(batch, exc)
                return
            self._finish(batch, outputs, start, assembled)
        finally:
            self._busy -= 1
            self._slots.release()

    def _split(self, batch: list[_Pending], outputs: list[np.ndarray], total: int) -> None:
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_result(outputs)
            return
        if any(o.ndim == 0 or o.shape[0] != total for o in outputs):
            self._fail(batch, ShipyardError("model outputs have no batch dimension; cannot split a batch"))
            return
        offset = 0
        for item in batch:
            if not item.future.done():
                item.future.set_result([o[offset : offset + item.size] for o in outputs])
            offset += item.size

    @staticmethod
    def _fail(batch: list[_Pending], error: ShipyardError) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(error)

    async def stop(self) -> None:
        """Refuse new requests, finish every queued and running one, then end the dispatch loop."""
        self._closing = True
        if self._inline is not None:
            if self._flush_pending is not None:
                self._flush_pending.cancel()
            self._flush()
            return
        self._arrived.set()
        if self._loop_task is not None:
            await self._loop_task
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)
