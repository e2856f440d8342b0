"""Who may call what: bearer tokens with scopes, the management switch, and per-caller rate limits.

Every transport asks the same AccessControl before they touch the data plane. Tokens are stored as sha256
digests (a leaked token file grants nothing); a token's scopes are `infer:*`, `infer:MODEL` (inference
and that model's metadata, config, readiness and statistics) and `admin` (the repository API and
server-wide statistics). Health endpoints stay open unless `open_health` is off, so probes need no
secret. The repository load/unload API is off unless the server is started with it.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shipyard.errors import ForbiddenError, InvalidInputError, RateLimitedError, UnauthenticatedError
from shipyard.serve.policy.rate_limit import RateLimiter

logger = logging.getLogger(__name__)
Action = Literal["health", "metadata", "read", "infer", "index", "admin"]
_SCOPE = r"^(admin|infer:(\*|[A-Za-z0-9_.-]+))$"


class TokenEntry(BaseModel):
    """One API key as the token file keeps it: never the key itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Who holds it (shown in logs and used as the rate-limit key)."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """sha256 of the token, hex."""
    scopes: list[str] = Field(min_length=1)
    """What it may do: `infer:*`, `infer:MODEL`, `admin`."""
    expires: datetime.datetime | None = None
    """When it stops working (UTC); never when absent."""

    @field_validator("expires")
    @classmethod
    def _utc(cls, value: datetime.datetime | None) -> datetime.datetime | None:
        # A time written without a zone is read as UTC, so it always compares with the clock.
        return value.replace(tzinfo=datetime.UTC) if value is not None and value.tzinfo is None else value

    def permits(self, action: Action, model: str | None) -> bool:
        if action in ("index", "admin"):
            return "admin" in self.scopes
        if action in ("read", "infer") and model is not None:
            return "infer:*" in self.scopes or f"infer:{model}" in self.scopes
        return True  # server metadata: any valid token


class TokenFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: list[TokenEntry] = Field(default_factory=list)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check_scopes(scopes: list[str], where: str) -> None:
    bad = [s for s in scopes if not re.match(_SCOPE, s)]
    if bad:
        raise InvalidInputError(f"{where}: unknown scopes {bad} (use infer:*, infer:MODEL or admin)")


def load_tokens(path: Path) -> dict[str, TokenEntry]:
    """The token file's entries by digest; InvalidInputError naming the problem."""
    try:
        parsed = TokenFile.model_validate(yaml.safe_load(path.read_text()) or {})
    except FileNotFoundError:
        raise InvalidInputError(f"token file not found: {path}") from None
    except (yaml.YAMLError, ValidationError) as exc:
        raise InvalidInputError(f"{path}: not a valid token file: {str(exc).splitlines()[0]}") from None
    for entry in parsed.tokens:
        _check_scopes(entry.scopes, f"{path}: token {entry.name!r}")
    return {entry.sha256: entry for entry in parsed.tokens}


def add_token(path: Path, name: str, scopes: list[str], expires: datetime.datetime | None = None) -> str:
    """Create a random token, append its digest to the file (created 0600), and return the token."""
    entries = list(load_tokens(path).values()) if path.exists() else []
    if any(e.name == name for e in entries):
        raise InvalidInputError(f"{path}: a token named {name!r} exists")
    _check_scopes(scopes, f"token {name!r}")
    token = secrets.token_urlsafe(32)
    entry = TokenEntry(name=name, sha256=digest(token), scopes=scopes, expires=expires)
    data = TokenFile(tokens=[*entries, entry]).model_dump(mode="json")
    if not path.exists():
        path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return token


class TokenFileWatch:
    """The token file's entries, read again when the file changes, so a token added or revoked while the server
    runs counts from the next request (the file is looked at once a second at most). A file that no longer
    reads as a token file keeps the entries read before, with a warning."""

    RECHECK_S = 1.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries = load_tokens(path)
        self._stamp = self._read_stamp()
        self._checked = time.monotonic()

    def _read_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def get(self, token_digest: str) -> TokenEntry | None:
        now = time.monotonic()
        if now - self._checked >= self.RECHECK_S:
            self._checked = now
            stamp = self._read_stamp()
            if stamp is not None and stamp != self._stamp:
                try:
                    self._entries = load_tokens(self.path)
                except InvalidInputError as exc:
                    logger.warning("kept the tokens read before: %s", exc)
                self._stamp = stamp
        return self._entries.get(token_digest)


@dataclass
class AccessControl:
    """The checks both transports run before the data plane; with no settings it lets everything through."""

    tokens: TokenFileWatch | None = None
    allow_management: bool = False
    limiter: RateLimiter | None = None
    open_health: bool = True

    def check(
        self, authorization: str | None, caller: str, action: Action, model: str | None = None
    ) -> TokenEntry | None:
        """Authenticate (once per request) and authorize; the caller's token entry, None without tokens."""
        if action == "health" and self.open_health:
            return None
        if action == "admin" and not self.allow_management:
            raise ForbiddenError(
                "the repository load/unload API is disabled (start the server with --allow-management)"
            )
        entry = None
        if self.tokens is not None:
            entry = self._authenticate(authorization)
            if not entry.permits(action, model):
                what = f"{action} {model}" if model else action
                raise ForbiddenError(f"token {entry.name!r} may not {what}")
            caller = entry.name
        if self.limiter is not None and not self.limiter.allow(caller):
            raise RateLimitedError(f"rate limit of {self.limiter.rate:g} requests/s exceeded; retry later")
        return entry

    def permits_model(self, entry: TokenEntry | None, action: Action, model: str) -> bool:
        """Whether the caller `check` let through (its token entry) may `action` the model: what a listing
        shows it."""
        return self.tokens is None or (entry is not None and entry.permits(action, model))

    def check_model(self, entry: TokenEntry | None, action: Action, model: str) -> None:
        """The per-model part of `check`, for routes that name the model in the body (OpenAI's), with the entry
        `check` authenticated (the token is not looked up again)."""
        if not self.permits_model(entry, action, model):
            name = entry.name if entry is not None else "(none)"
            raise ForbiddenError(f"token {name!r} may not {action} {model}")

    def _authenticate(self, authorization: str | None) -> TokenEntry:
        assert self.tokens is not None
        if not authorization:
            raise UnauthenticatedError("missing credentials: send Authorization: Bearer <token>")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise UnauthenticatedError("use Authorization: Bearer <token>")
        entry = self.tokens.get(digest(token.strip()))
        if entry is None:
            raise UnauthenticatedError("unknown or revoked token")
        if entry.expires is not None and datetime.datetime.now(datetime.UTC) >= entry.expires:
            raise UnauthenticatedError(f"token {entry.name!r} expired at {entry.expires.isoformat()}")
        return entry
