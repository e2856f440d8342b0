"""The supervisor of `shipyard serve --workers N`: one address, N worker processes, and nothing served here.

The supervisor binds the REST socket and hands the listening socket to every worker (they accept from one
queue, so a connection waiting there is taken by whichever worker is free, and survives a worker that dies);
gRPC's listeners join one SO_REUSEPORT group on the port the supervisor reserves. Each worker is a whole server
with its own sessions, batchers and key/value caches. Operations that must see every worker (readiness,
statistics, repository changes, drift, feedback: core/cluster.py) arrive here from the worker a client asked
and are fanned out to every worker; the answers go back to it. The supervisor also answers Prometheus with the
sum of every worker's figures, replaces a worker that dies (and counts it), and on SIGTERM drains them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import multiprocessing
import operator
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import Metric

from shipyard import cpus, memory
from shipyard.errors import UnavailableError
from shipyard.registry import LocalRegistry, VersionRecord
from shipyard.serve.core.cluster import Loaded, Observe, Operation, Outcome, Replies, T
from shipyard.serve.core.repository import serve_settings
from shipyard.serve.fleet import worker as worker_process
from shipyard.serve.observe.metrics import Snapshot, families
from shipyard.serve.policy.rate_limit import SharedBuckets
from shipyard.serve.server import listen, write_report
from shipyard.serve.settings import ServeSettings

logger = logging.getLogger(__name__)
SCRAPE_TIMEOUT_S = 10.0


def worker_count(requested: int | None, records: list[VersionRecord], registry: LocalRegistry,
                 memory_limit: int | None) -> int:  # fmt: skip
    """`requested` workers (None: `auto`, the usable CPUs), refused or capped when every worker's copy of the
    models would not fit the memory budget (or what is free). `auto` is one process when a language model is
    served: its scheduler already batches every stream on every core, and each further worker would hold
    another copy of the weights and key/value cache and take a share of the cores from it (measured in
    docs/benchmarks.md: 2 workers cut one stream's tokens/s by a third and doubled the memory)."""
    manifests = [registry.manifest(r) for r in records]
    need = sum(
        memory.estimate(registry.path(r), manifest, serve_settings(manifest).instances)
        for r, manifest in zip(records, manifests, strict=True)
    )
    room = memory_limit if memory_limit is not None else memory.available()
    fit = max(1, room // need) if room is not None and need > 0 else None
    language = [f"{m.name}:{m.version}" for m in manifests if m.generation is not None]
    if requested is None and language:
        logger.info("--workers auto: one process, since %s %s a language model (its scheduler batches "
                    "every stream on every core)", ", ".join(language),
                    "is" if len(language) == 1 else "are each")  # fmt: skip
        return 1
    if requested is None:
        return min(cpus.usable(), fit or cpus.usable())
    if requested > 1 and language:
        logger.warning("%d workers: each loads its own copy of %s with 1/%d of the cores; one process serves a "
                       "language model faster and in less memory (--workers 1 or auto)", requested,
                       ", ".join(language), requested)  # fmt: skip
    if fit is not None and requested > fit:
        where = "the --memory-limit" if memory_limit is not None else "free memory here"
        raise UnavailableError(
            f"{requested} workers each loading every model need about {memory.mib(need * requested)} "
            f"({memory.mib(need)} each), more than {where} ({memory.mib(room or 0)}): {fit} fit; "
            "use fewer workers or --workers auto"
        )
    return requested


def _reserve(host: str, port: int) -> socket.socket:
    """Hold the gRPC port (bound, not listening) so the workers' SO_REUSEPORT listeners are the only ones."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UnavailableError(f"cannot listen on {host}:{port} (gRPC): {exc.strerror}") from None
    return sock


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    up: bool = False  # reading its pipe: operations may be sent to it
    ready: bool = False
    failure: str | None = None
    observed: Snapshot | None = None  # its answer to the last scrape


@dataclass
class _Job:
    """One operation fanned out to every worker that is up; answered once each has replied or died."""

    origin: tuple[_Worker, int] | None  # the asking worker and its id; None: the supervisor's own
    op: Operation[Any]
    pending: set[int]
    missing: int
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    done: asyncio.Future[tuple[list[Outcome], int]] | None = None


class Supervisor:
    def __init__(self, settings: ServeSettings, registry: LocalRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.context = multiprocessing.get_context("spawn")
        self.workers: dict[int, _Worker] = {}
        self.jobs: dict[int, _Job] = {}
        self.ids = itertools.count()
        self.restarts = 0
        self.retired = Snapshot()  # what dead workers had counted at their last scrape
        self.refs = list(settings.models)  # what a replacement loads: the versions the others serve
        self.stop = asyncio.Event()
        self.changed = asyncio.Event()
        self.fatal: str | None = None
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- the pipes ------------------------------------------------------------------------------

    def _readable(self, worker: _Worker) -> None:
        try:
            while worker.conn.poll():
                self._handle(worker, worker.conn.recv())
        except (EOFError, OSError):
            assert self._loop is not None
            self._loop.remove_reader(worker.conn.fileno())

    def _handle(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "up":
            worker.up = True
        elif kind == "ready":
            worker.ready = True
            self.changed.set()
        elif kind == "failed":
            worker.failure = message[1]
        elif kind == "ask":
            self._fan_out((worker, message[1]), message[2])
        elif kind == "reply":
            job = self.jobs.get(message[1])
            if job is not None and worker.index in job.pending:
                job.pending.discard(worker.index)
                job.outcomes[worker.index] = message[2]
                ok, value = message[2]
                if isinstance(job.op, Observe) and ok:
                    worker.observed = value
                self._maybe_finish(message[1])

    def _fan_out(
        self, origin: tuple[_Worker, int] | None, op: Operation[Any],
        done: asyncio.Future[tuple[list[Outcome], int]] | None = None,
    ) -> None:  # fmt: skip
        targets = [w for w in self.workers.values() if w.up]
        job_id = next(self.ids)
        self.jobs[job_id] = _Job(origin, op, {w.index for w in targets}, self.settings.workers - len(targets),
                                 done=done)  # fmt: skip
        for target in targets:
            with contextlib.suppress(OSError):  # it is dying; its exit callback counts it missing
                target.conn.send(("do", job_id, op))
        self._maybe_finish(job_id)

    def _maybe_finish(self, job_id: int) -> None:
        job = self.jobs[job_id]
        if job.pending:
            return
        del self.jobs[job_id]
        outcomes = [job.outcomes[i] for i in sorted(job.outcomes)]
        if job.done is not None:
            job.done.set_result((outcomes, job.missing))
        elif job.origin is not None:
            asker, ask = job.origin
            if asker.index in self.workers and self.workers[asker.index] is asker:
                with contextlib.suppress(OSError):  # the asker is dying
                    asker.conn.send(("answer", ask, outcomes, job.missing))

    async def each(self, op: Operation[T]) -> Replies[T]:
        """The supervisor's own operation on every worker; a worker that failed it counts as missing."""
        assert self._loop is not None
        done: asyncio.Future[tuple[list[Outcome], int]] = self._loop.create_future()
        self._fan_out(None, op, done)
        outcomes, missing = await done
        return Replies([value for ok, value in outcomes if ok], missing + sum(not ok for ok, _ in outcomes))

    # --- the processes ---------------------------------------------------------------------------

    def _spawn(
        self, index: int, http_socket: socket.socket, buckets: SharedBuckets | None, replacement: bool = False
    ) -> None:
        assert self._loop is not None
        mine, theirs = self.context.Pipe()
        settings = replace(self.settings, models=self.refs, metrics_port=0, report_file=None)
        process = self.context.Process(
            target=worker_process.main, name=f"shipyard-worker-{index}",
            args=(index, settings, self.registry.root, http_socket, theirs, buckets, replacement),
        )  # fmt: skip
        process.start()
        theirs.close()
        worker = _Worker(index, process, mine)
        self.workers[index] = worker
        self._loop.add_reader(mine.fileno(), self._readable, worker)
        self._loop.add_reader(process.sentinel, self._exited, worker, http_socket, buckets)

    def _exited(self, worker: _Worker, http_socket: socket.socket, buckets: SharedBuckets | None) -> None:
        assert self._loop is not None
        self._loop.remove_reader(worker.process.sentinel)
        self._loop.remove_reader(worker.conn.fileno())
        worker.process.join()
        worker.conn.close()
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        for job_id, job in list(self.jobs.items()):  # what it had not answered, it never will
            if worker.index in job.pending:
                job.pending.discard(worker.index)
                job.missing += 1
                self._maybe_finish(job_id)
        self.changed.set()
        if self.stopping:
            return
        if not worker.ready:  # a worker that cannot start will not start on a second try either
            self.fatal = worker.failure or f"worker {worker.index} exited ({worker.process.exitcode}) during start-up"
            self.stop.set()
            return
        self.restarts += 1
        if worker.observed is not None:  # else the summed counters would drop by what it had counted
            self.retired = self.retired + worker.observed.counts()
        logger.warning("worker %d (pid %s) died (exit %s); starting a replacement (%d replaced so far)",
                       worker.index, worker.process.pid, worker.process.exitcode, self.restarts)  # fmt: skip
        task = self._loop.create_task(self._replace(worker.index, http_socket, buckets))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replace(self, index: int, http_socket: socket.socket, buckets: SharedBuckets | None) -> None:
        await self._refresh_refs()
        if not self.stopping:
            self._spawn(index, http_socket, buckets, replacement=True)

    async def _refresh_refs(self) -> None:
        loaded = (await self.each(Loaded())).values
        if loaded:
            self.refs = loaded[0]

    # --- metrics ---------------------------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        live = functools.reduce(operator.add, (await self.each(Observe())).values, Snapshot())
        self.retired = self.retired.within(live)
        return self.retired + live + Snapshot(worker_restarts=self.restarts)

    def collect(self) -> Iterator[Metric]:
        """Prometheus's collector interface, called on its listener's thread."""
        assert self._loop is not None
        snapshot = asyncio.run_coroutine_threadsafe(self.snapshot(), self._loop).result(SCRAPE_TIMEOUT_S)
        yield from families(snapshot)

    # --- the whole run ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Start every worker, wait until all are ready, serve until SIGINT/SIGTERM, then drain them."""
        s = self.settings
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._loop.add_signal_handler(sig, self.stop.set)
        http_socket = listen(s.host, s.http_port, "REST")
        grpc_port = metrics_server = None
        try:
            grpc_port = _reserve(s.host, s.grpc_port)
            if s.metrics_port:
                registry = CollectorRegistry(auto_describe=False)
                registry.register(self)
                try:
                    metrics_server, _ = start_http_server(s.metrics_port, addr=s.host, registry=registry)
                except OSError as exc:
                    raise UnavailableError(
                        f"cannot listen on {s.host}:{s.metrics_port} (metrics): {exc.strerror}"
                    ) from None
            buckets = SharedBuckets(self.context) if s.rate_limit else None
            for index in range(s.workers):
                self._spawn(index, http_socket, buckets)
            await self._until_ready()
            if self.fatal is None and not self.stop.is_set():
                await self._refresh_refs()
                self._report()
                await self.stop.wait()
        finally:
            await self._drain()
            if metrics_server is not None:
                metrics_server.shutdown()
            if grpc_port is not None:
                grpc_port.close()
            http_socket.close()
        if self.fatal is not None:
            raise UnavailableError(self.fatal)

    async def _until_ready(self) -> None:
        while not self.stop.is_set():
            if len(self.workers) == self.settings.workers and all(w.ready for w in self.workers.values()):
                return
            self.changed.clear()
            waits = [asyncio.ensure_future(self.changed.wait()), asyncio.ensure_future(self.stop.wait())]
            _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for wait in pending:
                wait.cancel()

    def _report(self) -> None:
        s = self.settings
        logger.info("serving with %d workers: HTTP %s:%d, gRPC %s:%d, metrics :%d", s.workers, s.host, s.http_port,
                    s.host, s.grpc_port, s.metrics_port)  # fmt: skip
        if s.report_file is not None:  # every worker is ready
            write_report(s.report_file, {"pid": os.getpid(), "http_port": s.http_port, "workers": s.workers})

    async def _drain(self) -> None:
        """SIGTERM to every worker (each stops accepting, finishes what it has, unloads), then wait for them."""
        self.stopping = True
        if self.settings.report_file is not None:
            self.settings.report_file.unlink(missing_ok=True)
        for worker in list(self.workers.values()):
            if worker.process.is_alive():
                worker.process.terminate()
        deadline = asyncio.get_running_loop().time() + self.settings.drain_seconds + 15
        while self.workers and asyncio.get_running_loop().time() < deadline:
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 0.5)
        for worker in list(self.workers.values()):  # past the drain deadline
            worker.process.kill()
            worker.process.join()
