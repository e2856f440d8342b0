"""A worker's end of its pipe to the supervisor: the cluster (core/cluster.py) of a server with several workers.

Messages are pickled tuples. Worker to supervisor: ("up",) once it reads, ("ready",) once its models are loaded,
("failed", message) when it cannot start, ("ask", id, op, args) to run an operation on every worker, and
("reply", job, outcome) with its own part of one. Supervisor to worker: ("do", job, op, args) and
("answer", id, outcomes, missing). Everything runs on the worker's event loop; the pipe is read when readable.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from shipyard.errors import UnavailableError
from shipyard.serve.core.cluster import Cluster, LocalOps, Operation, Outcome, Replies, T, unpack

logger = logging.getLogger(__name__)


class Link:
    def __init__(self, conn: Connection, on_lost: Callable[[], None]) -> None:
        self.conn = conn
        self.on_lost = on_lost  # the supervisor is gone: this worker stops too
        self._ops: LocalOps | None = None
        self._asks: dict[int, asyncio.Future[tuple[list[Outcome], int]]] = {}
        self._ids = itertools.count()
        self._jobs: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def join(self, ops: LocalOps) -> Cluster:
        """The composition root's hook: this worker's operations, and the cluster it answers through."""
        self._ops = ops
        return self

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.conn.fileno(), self._readable)
        self._send(("up",))

    def ready(self) -> None:
        self._send(("ready",))

    def failed(self, message: str) -> None:
        self._send(("failed", message))

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self.conn.send(message)
        except OSError:
            self._lost()

    def _lost(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.conn.fileno())
        for future in self._asks.values():
            if not future.done():
                future.set_exception(UnavailableError("the server's supervisor stopped"))
        self._asks.clear()
        self.on_lost()

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                message = self.conn.recv()
                if message[0] == "do":
                    task = asyncio.get_running_loop().create_task(self._do(*message[1:]))
                    self._jobs.add(task)
                    task.add_done_callback(self._jobs.discard)
                else:  # ("answer", id, outcomes, missing)
                    future = self._asks.pop(message[1], None)
                    if future is not None and not future.done():
                        future.set_result((message[2], message[3]))
        except (EOFError, OSError):
            self._lost()

    async def _do(self, job: int, op: Operation[Any]) -> None:
        assert self._ops is not None  # joined (compose) before start() tells the supervisor it is up
        self._send(("reply", job, await self._ops.run(op)))

    async def each(self, op: Operation[T]) -> Replies[T]:
        ask = next(self._ids)
        future: asyncio.Future[tuple[list[Outcome], int]] = asyncio.get_running_loop().create_future()
        self._asks[ask] = future
        self._send(("ask", ask, op))
        outcomes, missing = await future
        for ok, value in outcomes:
            if not ok:
                raise unpack(value)
        return Replies([value for _, value in outcomes], missing)
