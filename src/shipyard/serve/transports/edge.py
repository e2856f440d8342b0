"""Where errors leave the server: each error kind's HTTP status and gRPC code, and what a client may read.

A client sees the message of a user-facing error and only "internal error" for anything else; the details
of those go to the log, here, once.
"""

from __future__ import annotations

import logging

import grpc

from shipyard.errors import ErrorKind, ShipyardError

logger = logging.getLogger("shipyard.serve")

HTTP_STATUS = {
    ErrorKind.INVALID: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.UNSAFE: 403,
    ErrorKind.FAILED_CHECK: 400,
    ErrorKind.CORRUPT: 500,
    ErrorKind.MISSING_DEPENDENCY: 500,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.OVERLOADED: 503,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.RATE_LIMITED: 429,
    ErrorKind.TIMEOUT: 504,
    ErrorKind.INCOMPLETE: 408,
    ErrorKind.INTERNAL: 500,
}
GRPC_STATUS = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.CONFLICT: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.UNSAFE: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.FAILED_CHECK: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.CORRUPT: grpc.StatusCode.INTERNAL,
    ErrorKind.MISSING_DEPENDENCY: grpc.StatusCode.INTERNAL,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INCOMPLETE: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}
# Kinds whose message is about the server's own state or code, not the request: never sent to a client.
_PRIVATE = frozenset(kind for kind, status in HTTP_STATUS.items() if status == 500)


def public_error(exc: BaseException, where: str) -> tuple[ErrorKind, str]:
    """The kind of an error and the message a client may see; internal errors are logged (with `where`)."""
    if isinstance(exc, ShipyardError):
        if exc.kind not in _PRIVATE:
            return exc.kind, exc.message
        logger.error("internal error serving %s: %s", where, exc)
    else:
        logger.error("unhandled error serving %s", where, exc_info=exc)
    return ErrorKind.INTERNAL, "internal error"
