"""Model references: `name`, `name:version`, `name@alias`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shipyard.errors import InvalidInputError
from shipyard.spec.models import NAME_PATTERN

_NAME = re.compile(NAME_PATTERN)


def check_name(value: str, what: str = "model name") -> str:
    """Return `value` if it is a safe registry name (no path separators, no leading dot)."""
    if not _NAME.fullmatch(value):
        raise InvalidInputError(
            f"invalid {what} {value!r}: use 1-128 letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        return f"{self.name}@{self.alias}" if self.alias is not None else self.name


def parse_ref(text: str) -> ModelRef:
    """Parse `name`, `name:version` or `name@alias`; raises an invalid-kind error otherwise."""
    if "@" in text:
        name, alias = text.split("@", 1)
        return ModelRef(check_name(name), alias=check_name(alias, "alias"))
    if ":" in text:
        name, version = text.split(":", 1)
        if not version.isdigit() or int(version) < 1:
            raise InvalidInputError(f"invalid version in {text!r}: expected a positive number")
        return ModelRef(check_name(name), version=int(version))
    return ModelRef(check_name(text))
