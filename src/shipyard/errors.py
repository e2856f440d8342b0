"""One exception tree for the whole package.

Every error carries a semantic kind; transports (CLI exit codes, HTTP statuses, gRPC codes) map
kinds to their own codes at the edge, so nothing here imports a transport.
"""

from __future__ import annotations

import enum
import reprlib

_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlist, _BRIEF.maxdict = 2, 60, 60, 4, 4


def brief(value: object) -> str:
    """A short repr of a value a client sent, for an error message: bounded in length and depth, so a huge
    or deeply nested value costs nothing to show."""
    return _BRIEF.repr(value)


class ErrorKind(enum.Enum):
    INVALID = "invalid"  # the caller sent something malformed
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"  # the request clashes with the current state
    UNSAFE = "unsafe"  # refused for security reasons (e.g. untrusted pickle)
    FAILED_CHECK = "failed_check"  # a verification gate failed (tolerance, accuracy)
    CORRUPT = "corrupt"  # stored data does not match its recorded hashes or cannot be parsed
    MISSING_DEPENDENCY = "missing_dependency"
    UNAVAILABLE = "unavailable"
    OVERLOADED = "overloaded"  # a bounded queue is full: retry later
    TOO_LARGE = "too_large"  # a request exceeds a configured size limit
    UNAUTHENTICATED = "unauthenticated"  # no or unknown credentials
    FORBIDDEN = "forbidden"  # known credentials without the right, or a disabled API
    RATE_LIMITED = "rate_limited"  # the caller's request rate is over its limit: slow down
    TIMEOUT = "timeout"  # no answer within the configured time
    INCOMPLETE = "incomplete"  # the client did not send its whole request within the configured time
    INTERNAL = "internal"


class ShipyardError(Exception):
    """Base class: a message meant for the user plus a kind for mapping to codes."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(
        self, message: str, *, kind: ErrorKind | None = None, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind
        self.param = param  # the request field at fault, when one is (OpenAI's error shape names it)
        self.code = code  # a machine-readable reason more precise than the kind (e.g. context_length_exceeded)

    def __str__(self) -> str:
        return self.message


class InvalidInputError(ShipyardError):
    kind = ErrorKind.INVALID


class SpecError(InvalidInputError):
    pass


class ModelLoadError(ShipyardError):
    kind = ErrorKind.INVALID


class UnsafeModelError(ShipyardError):
    kind = ErrorKind.UNSAFE


class ConversionError(ShipyardError):
    kind = ErrorKind.FAILED_CHECK


class EvaluationError(ShipyardError):
    kind = ErrorKind.INVALID


class NotFoundError(ShipyardError):
    kind = ErrorKind.NOT_FOUND


class ConflictError(ShipyardError):
    kind = ErrorKind.CONFLICT


class IntegrityError(ShipyardError):
    kind = ErrorKind.CORRUPT


class MissingExtraError(ShipyardError):
    kind = ErrorKind.MISSING_DEPENDENCY


class UnavailableError(ShipyardError):
    kind = ErrorKind.UNAVAILABLE


class OverloadedError(ShipyardError):
    kind = ErrorKind.OVERLOADED


class TooLargeError(ShipyardError):
    kind = ErrorKind.TOO_LARGE


class UnauthenticatedError(ShipyardError):
    kind = ErrorKind.UNAUTHENTICATED


class ForbiddenError(ShipyardError):
    kind = ErrorKind.FORBIDDEN


class RateLimitedError(ShipyardError):
    kind = ErrorKind.RATE_LIMITED


class TimedOutError(ShipyardError):
    kind = ErrorKind.TIMEOUT


class IncompleteRequestError(ShipyardError):
    kind = ErrorKind.INCOMPLETE


class FailedCheckError(ShipyardError):
    kind = ErrorKind.FAILED_CHECK
