"""gRPC through the native front end (native/grpc_front.cc, built by scripts/setup.sh when gRPC's C++ library
is at hand): the same service, methods and error codes as grpc.aio (grpc.py's method table), with the HTTP/2
work on C++ threads and every message that arrived since the last look handed to the event loop at once.

One thread waits in `fe_poll` (ctypes releases the GIL) and passes each batch of events to the loop in one
callback, so the requests that arrived together are decoded in the same turn and share a batch.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
from pathlib import Path
from typing import Any, NoReturn

import grpc

from shipyard.errors import UnavailableError
from shipyard.serve.transports.grpc import Method

logger = logging.getLogger(__name__)
LIBRARY = Path(__file__).with_name("libshipyard_grpc.so")
POLL_MS, POLL_MAX = 100, 512
_END = object()  # the client closed its side of a stream


def available() -> bool:
    return LIBRARY.exists()


class _Abort(grpc.aio.AbortError):  # type: ignore[misc]
    """What context.abort raises; the servicer lets AbortError through to here."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _Context:
    """The part of grpc.aio's ServicerContext the servicer uses."""

    __slots__ = ("_metadata", "_peer")

    def __init__(self, metadata: tuple[tuple[str, str], ...], peer: str) -> None:
        self._metadata, self._peer = metadata, peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise _Abort(code, details)


def _library() -> tuple[ctypes.CDLL, ctypes.PyDLL]:
    blocking = ctypes.CDLL(str(LIBRARY))  # these release the GIL while they wait
    blocking.fe_start.restype = ctypes.c_void_p
    blocking.fe_start.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                                  ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]  # fmt: skip
    blocking.fe_poll.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    blocking.fe_stop.argtypes = [ctypes.c_void_p, ctypes.c_int]
    blocking.fe_free.argtypes = [ctypes.c_void_p]
    quick = ctypes.PyDLL(str(LIBRARY))  # these take microseconds: no GIL round trip
    size, text = ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_void_p)
    quick.fe_event.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_uint64),
                               ctypes.POINTER(ctypes.c_int), text, size, text, size, text, size,
                               text, size]  # fmt: skip
    quick.fe_send.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int,
                              ctypes.c_int, ctypes.c_char_p]  # fmt: skip
    return blocking, quick


class NativeGrpc:
    """The gRPC listener: started when made (on the running loop), stopped with `stop`."""

    def __init__(self, table: dict[str, Method], *, address: str, max_receive: int, reuse_port: bool,
                 tls: tuple[bytes, bytes] | None = None, threads: int = 1) -> None:  # fmt: skip
        self.table = table
        self._blocking, self._quick = _library()
        streaming = "\n".join(path for path, m in table.items() if m.streaming).encode()
        key, cert = tls if tls is not None else (None, None)
        port = ctypes.c_int(0)
        self._handle = self._blocking.fe_start(address.encode(), max_receive, int(reuse_port), streaming, key, cert,
                                               threads, ctypes.byref(port))  # fmt: skip
        if not self._handle:
            raise UnavailableError(f"cannot listen on {address} (gRPC): address in use or not local")
        self._loop = asyncio.get_running_loop()
        self._streams: dict[int, tuple[asyncio.Queue[Any], Method]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._call, self._kind = ctypes.c_uint64(), ctypes.c_int()
        self._pointers = [ctypes.c_void_p() for _ in range(4)]  # method, payload, authorization, peer
        self._lengths = [ctypes.c_size_t() for _ in range(4)]
        pairs = [ctypes.byref(f) for pair in zip(self._pointers, self._lengths, strict=True) for f in pair]
        self._out = [ctypes.byref(self._call), ctypes.byref(self._kind), *pairs]
        self._thread = threading.Thread(target=self._poll, name="grpc-native", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while True:
            count = self._blocking.fe_poll(self._handle, POLL_MS, POLL_MAX)
            if count < 0:
                return
            if count:
                self._loop.call_soon_threadsafe(self._dispatch, [self._event(i) for i in range(count)])

    def _event(self, i: int) -> tuple[int, int, str, bytes, str, str]:
        self._quick.fe_event(self._handle, i, *self._out)
        method, payload, authorization, peer = (
            ctypes.string_at(pointer.value or 0, length.value) if length.value else b""
            for pointer, length in zip(self._pointers, self._lengths, strict=True)
        )
        call, kind = self._call.value, self._kind.value
        return call, kind, method.decode(), payload, authorization.decode("latin-1"), peer.decode()

    def _send(self, call: int, payload: bytes | None, finish: bool, code: grpc.StatusCode = grpc.StatusCode.OK,
              message: str = "") -> None:  # fmt: skip
        self._quick.fe_send(
            self._handle, call, payload, len(payload or b""), int(finish), code.value[0], message.encode()
        )

    def _dispatch(self, events: list[tuple[int, int, str, bytes, str, str]]) -> None:
        for call, kind, method, payload, authorization, peer in events:
            if kind == 1:  # the client closed its side of a stream
                if call in self._streams:
                    self._streams[call][0].put_nowait(_END)
            elif call in self._streams:  # the next message of a stream
                queue, stream_method = self._streams[call]
                queue.put_nowait(stream_method.parse(payload))
            elif not method:  # a message of a stream that has already been answered and finished
                continue
            elif method not in self.table:
                self._send(call, None, True, grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method}")
            else:
                found = self.table[method]
                context = _Context((("authorization", authorization),) if authorization else (), peer)
                if found.streaming:
                    queue = asyncio.Queue[Any]()
                    queue.put_nowait(found.parse(payload))
                    self._streams[call] = (queue, found)
                    task = self._loop.create_task(self._stream(call, found, queue, context))
                else:
                    task = self._loop.create_task(self._unary(call, found, found.parse(payload), context))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _unary(self, call: int, method: Method, request: Any, context: _Context) -> None:
        try:
            response = await method.behaviour(request, context)
        except _Abort as abort:
            self._send(call, None, True, abort.code, abort.details)
        except Exception:  # the servicer turns every error into an abort; anything else is a bug
            logger.exception("gRPC call failed")
            self._send(call, None, True, grpc.StatusCode.INTERNAL, "internal error (see the server log)")
        else:
            self._send(call, method.serialize(response), True)

    async def _stream(self, call: int, method: Method, queue: asyncio.Queue[Any], context: _Context) -> None:
        async def requests() -> Any:
            while (item := await queue.get()) is not _END:
                yield item

        try:
            async for response in method.behaviour(requests(), context):
                self._send(call, method.serialize(response), False)
        except _Abort as abort:
            self._send(call, None, True, abort.code, abort.details)
        except Exception:
            logger.exception("gRPC stream failed")
            self._send(call, None, True, grpc.StatusCode.INTERNAL, "internal error (see the server log)")
        else:
            self._send(call, None, True)
        finally:
            self._streams.pop(call, None)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting; calls in flight have `grace_s` to finish (the loop keeps answering them)."""
        await asyncio.to_thread(self._blocking.fe_stop, self._handle, int(grace_s * 1000))
        await asyncio.to_thread(self._thread.join)
        self._blocking.fe_free(self._handle)
