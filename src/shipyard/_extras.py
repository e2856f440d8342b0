"""Import optional dependencies with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from shipyard.errors import MissingExtraError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`, or raise MissingExtraError naming `pip install 'shipyard[extra]'`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{purpose} needs the '{extra}' extra ({exc.name or module} is not installed): "
            f"pip install 'shipyard[{extra}]'"
        ) from exc
