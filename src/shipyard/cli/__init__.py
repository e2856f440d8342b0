"""The `shipyard` command: parse arguments, call the library, render results.

One module per group of commands (build, models, serve, deploy, operate, security), each a Typer app of
plain functions merged here; `main` turns errors into one red line and an exit code by kind.
"""

from __future__ import annotations

import errno
import sys
from typing import NoReturn

import typer
from rich.markup import escape

from shipyard.cli import build, deploy, models, operate, security, serve
from shipyard.cli._common import environment, err
from shipyard.errors import ErrorKind, ShipyardError

app = typer.Typer(
    name="shipyard",
    help="From a trained model file to a production inference service, in one declarative spec.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for group in (build, models, serve, deploy, security, operate):
    app.add_typer(group.app)

# Errors of the disk a command writes to: full, over quota, read-only, failing.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
EXIT_CODES = {
    ErrorKind.INTERNAL: 1,
    ErrorKind.INVALID: 2,
    ErrorKind.NOT_FOUND: 3,
    ErrorKind.CONFLICT: 4,
    ErrorKind.UNSAFE: 5,
    ErrorKind.FAILED_CHECK: 6,
    ErrorKind.CORRUPT: 7,
    ErrorKind.MISSING_DEPENDENCY: 8,
    ErrorKind.UNAVAILABLE: 9,
    ErrorKind.OVERLOADED: 9,
    ErrorKind.TOO_LARGE: 2,
    ErrorKind.UNAUTHENTICATED: 5,
    ErrorKind.FORBIDDEN: 5,
    ErrorKind.RATE_LIMITED: 9,
    ErrorKind.TIMEOUT: 9,
    ErrorKind.INCOMPLETE: 9,
}


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one red line and an exit code by kind, never a traceback."""
    try:
        app(args=argv)
    except ShipyardError as exc:
        for i, line in enumerate(str(exc).splitlines()):
            text = f"[bold red]error:[/] {escape(line)}" if i == 0 else f"       {escape(line)}"
            err.print(text, highlight=False, soft_wrap=True)
        sys.exit(EXIT_CODES[exc.kind])
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]: nothing was registered")
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            _internal(exc)
        # The disk, not Shipyard: say which file and why, with the storage exit code.
        where = f": {exc.filename}" if exc.filename else ""
        err.print(
            f"[bold red]error:[/] storage: {escape(exc.strerror or str(exc))}{escape(str(where))}", soft_wrap=True
        )
        sys.exit(EXIT_CODES[ErrorKind.UNAVAILABLE])
    except Exception as exc:
        _internal(exc)


def _internal(exc: Exception) -> NoReturn:
    """An error nobody foresaw: one line, and the way to the traceback."""
    if environment().debug:
        raise exc
    err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}", soft_wrap=True)
    err.print("set SHIPYARD_DEBUG=1 for the traceback and report it as a bug")
    sys.exit(1)
