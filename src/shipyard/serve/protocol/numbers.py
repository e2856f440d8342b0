"""Numbers a client sends in text (headers, path segments, parameters): ASCII digits, bounded, or a clear 400.

Python's int() accepts other scripts' digits (an Arabic-Indic one is 1) and raises past 4,300 digits, which
became 500s with a traceback per request; every whole number that comes from a client is parsed here instead.
"""

from __future__ import annotations

from shipyard.errors import InvalidInputError

MAX_DIGITS = 18  # every such number fits in a signed 64-bit integer


def parse_count(text: str | bytes, what: str) -> int:
    """A non-negative whole number written in at most MAX_DIGITS ASCII digits; InvalidInputError otherwise."""
    value = text.decode("latin-1") if isinstance(text, bytes) else text
    if not 0 < len(value) <= MAX_DIGITS or not value.isascii() or not value.isdigit():
        shown = value if len(value) <= 24 else f"{value[:24]}… ({len(value)} characters)"
        raise InvalidInputError(f"{what} must be a whole number of at most {MAX_DIGITS} ASCII digits, got {shown!r}")
    return int(value)
