"""One worker process of `shipyard serve --workers N`: a whole server (compose, listeners, models) whose
REST socket comes from the supervisor and whose server-wide operations go through its link."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from multiprocessing.connection import Connection
from pathlib import Path

from shipyard.errors import ShipyardError
from shipyard.registry import LocalRegistry
from shipyard.serve.fleet.link import Link
from shipyard.serve.policy.rate_limit import Buckets
from shipyard.serve.server import ShipyardServer, WorkerRole
from shipyard.serve.settings import ServeSettings


def main(
    index: int, settings: ServeSettings, registry: Path, http_socket: socket.socket, conn: Connection,
    buckets: Buckets | None, replacement: bool,
) -> None:  # fmt: skip
    """The spawned process's entry point (arguments pickled by multiprocessing; the socket passed as a handle)."""
    import uvloop

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s worker {index}: %(message)s")
    # Ctrl-C reaches the whole process group: the supervisor turns it into SIGTERM for each worker, once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    uvloop.run(_serve(index, settings, LocalRegistry(registry), http_socket, conn, buckets, replacement))


async def _serve(
    index: int, settings: ServeSettings, registry: LocalRegistry, http_socket: socket.socket, conn: Connection,
    buckets: Buckets | None, replacement: bool,
) -> None:  # fmt: skip
    stop = asyncio.Event()
    link = Link(conn, stop.set)
    server = ShipyardServer(settings, registry, WorkerRole(index, link, http_socket, buckets, replacement))
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    link.start()
    try:
        await server.start()
    except ShipyardError as exc:
        link.failed(str(exc))
        await server.shutdown()
        return
    except BaseException:
        link.failed("the worker failed during start-up (see its log)")
        await server.shutdown()
        raise
    link.ready()
    logging.getLogger(__name__).info("ready (gRPC: %s)", server.grpc_frontend)
    await stop.wait()
    await server.shutdown()
