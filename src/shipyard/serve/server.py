"""The listeners: REST (uvicorn), gRPC (transports/grpc_native.py or grpc.aio) and Prometheus over the parts
app.compose builds, with start-up (live at once, ready once every model is loaded and warm) and a draining
shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import uvicorn
from prometheus_client import start_http_server

from shipyard.errors import UnavailableError
from shipyard.registry import LocalRegistry
from shipyard.serve.app import compose
from shipyard.serve.fleet.link import Link
from shipyard.serve.policy.rate_limit import Buckets
from shipyard.serve.settings import ServeSettings
from shipyard.serve.transports import grpc_native
from shipyard.serve.transports.grpc import add_servicer, methods

logger = logging.getLogger(__name__)


def listen(host: str, port: int, what: str) -> socket.socket:
    """Bind the REST socket here, so a taken port is a clear error rather than uvicorn's sys.exit."""
    try:
        sock = socket.create_server((host, port), reuse_port=False, backlog=2048)
    except OSError as exc:
        raise UnavailableError(f"cannot listen on {host}:{port} ({what}): {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def write_report(path: Path, fields: dict[str, Any]) -> None:
    """The --report-file a supervisor waits for, written whole (renamed into place) so it is never read half-done."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(fields))
    partial.replace(path)


class _Uvicorn(uvicorn.Server):
    # The server owns signal handling (it must also drain gRPC and the batchers), so uvicorn
    # must not install its own handlers or re-raise the signal when it exits.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(frozen=True)
class WorkerRole:
    """What makes a server one worker of several (serve/fleet): the supervisor's listening REST socket, its
    link, the shared rate buckets; gRPC joins the others on the same port with SO_REUSEPORT. A replacement
    joins while the others serve, so it takes connections only once it can answer them."""

    index: int
    link: Link
    http_socket: socket.socket
    buckets: Buckets | None
    replacement: bool


class ShipyardServer:
    """REST (uvicorn), gRPC (the native front end or grpc.aio) and Prometheus listeners over one data plane."""

    def __init__(self, settings: ServeSettings, registry: LocalRegistry, role: WorkerRole | None = None) -> None:
        self.settings = settings
        self.role = role
        if role is None:
            self.parts = compose(settings, registry)
        else:
            self.parts = compose(settings, registry, role.link.join, role.buckets, role.index)
        self.repository = self.parts.repository
        self.dataplane = self.parts.services.dataplane
        self._stop = asyncio.Event()
        self.http: _Uvicorn | None = None
        self.grpc: grpc.aio.Server | grpc_native.NativeGrpc | None = None
        self._metrics_server: Any = None

    @property
    def grpc_frontend(self) -> str:
        return "native front end" if isinstance(self.grpc, grpc_native.NativeGrpc) else "grpc.aio"

    def request_stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        """Open the listeners (live at once), then load and warm every model (ready after). A replacement
        worker loads first: the accept queue and the reuse-port group it joins are the live workers' too."""
        s = self.settings
        self.repository.resolve_all(s.models)  # a name that does not exist stops the server before it listens
        if self.role is not None and self.role.replacement:
            await self._load()
        http_socket = listen(s.host, s.http_port, "REST") if self.role is None else self.role.http_socket
        if s.metrics_port:
            try:
                self._metrics_server, _ = start_http_server(
                    s.metrics_port, addr=s.host, registry=self.parts.metrics.registry
                )
            except OSError as exc:
                http_socket.close()
                raise UnavailableError(
                    f"cannot listen on {s.host}:{s.metrics_port} (metrics): {exc.strerror}"
                ) from None
        try:
            await self._start_grpc()
        except BaseException:
            http_socket.close()
            raise
        config = uvicorn.Config(
            self.parts.rest, host=s.host, port=s.http_port, http="httptools", loop="none", lifespan="off",
            access_log=False, log_level="warning", timeout_graceful_shutdown=int(s.drain_seconds), proxy_headers=False,
            ssl_certfile=s.tls_cert, ssl_keyfile=s.tls_key,
        )  # fmt: skip
        self.http = _Uvicorn(config)
        self._http_task = asyncio.create_task(self.http.serve(sockets=[http_socket]))
        while not self.http.started:
            if self._http_task.done():
                raise UnavailableError(f"the REST server stopped during start-up on {s.host}:{s.http_port}")
            await asyncio.sleep(0.01)
        if self.role is None or not self.role.replacement:
            await self._load()

    async def _load(self) -> None:
        s = self.settings
        await self.repository.load_all(s.models)
        self.dataplane.loading_done = True
        if s.report_file is not None:  # this process, not whatever else may answer on the port, is ready
            write_report(s.report_file, {"pid": os.getpid(), "http_port": s.http_port})

    async def _start_grpc(self) -> None:
        """The native front end when it is built (or asked for), else grpc.aio; either way the same methods."""
        s = self.settings
        native = s.grpc_frontend == "native" or (s.grpc_frontend == "auto" and grpc_native.available())
        tls = None if s.tls_cert is None or s.tls_key is None else (s.tls_key.read_bytes(), s.tls_cert.read_bytes())
        address = f"{s.host}:{s.grpc_port}"
        if native:
            if not grpc_native.available():
                raise UnavailableError(
                    "--grpc-frontend native: the native gRPC front end is not built here (scripts/setup.sh builds "
                    "it where gRPC's C++ library, Debian's libgrpc++-dev, is installed)"
                )
            self.grpc = grpc_native.NativeGrpc(
                methods(self.parts.services, self.parts.access), address=address, max_receive=s.max_body_bytes,
                reuse_port=self.role is not None, tls=tls,
            )  # fmt: skip
            return
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", s.max_body_bytes),
                ("grpc.max_send_message_length", 1 << 30),
                ("grpc.so_reuseport", int(self.role is not None)),
            ]
        )
        add_servicer(server, self.parts.services, self.parts.access)
        try:
            if tls is not None:
                server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
            else:
                server.add_insecure_port(address)
        except RuntimeError:
            raise UnavailableError(f"cannot listen on {address} (gRPC): address in use or not local") from None
        await server.start()
        self.grpc = server

    async def serve_forever(self) -> None:
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish, drain batchers, unload."""
        self.dataplane.loading_done = False  # readiness drops first so load balancers move away
        if self.settings.report_file is not None:
            self.settings.report_file.unlink(missing_ok=True)
        if self.http is not None:
            self.http.should_exit = True
        if self.grpc is not None:
            await self.grpc.stop(self.settings.drain_seconds)
        if self.http is not None:
            await self._http_task
        await self.repository.unload_all()
        if self.parts.request_log is not None:
            await asyncio.to_thread(self.parts.request_log.close)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()


async def run(settings: ServeSettings, registry: LocalRegistry) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully."""
    server = ShipyardServer(settings, registry)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.request_stop)
    try:
        await server.start()
    except BaseException:
        await server.shutdown()  # close the listeners already open before the error reaches the user
        raise
    logger.info(
        "serving %d model version(s): HTTP %s:%d, gRPC %s:%d (%s), metrics :%d",
        len(server.repository.handles()), settings.host, settings.http_port, settings.host, settings.grpc_port,
        server.grpc_frontend, settings.metrics_port,
    )  # fmt: skip
    await server.serve_forever()
