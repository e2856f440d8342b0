"""Import `module:attribute` references from the spec's folder."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shipyard.errors import ModelLoadError


def forget_shadowed(top: str, base_dir: Path) -> None:
    # Two specs in one process may each ship a `model.py`: when the spec's folder has its own
    # `top` module but one from another folder is cached, drop the cached one.
    if not ((base_dir / f"{top}.py").is_file() or (base_dir / top / "__init__.py").is_file()):
        return
    cached = getattr(sys.modules.get(top), "__file__", None)
    if cached is not None and base_dir not in Path(cached).resolve().parents:
        for name in [n for n in sys.modules if n == top or n.startswith(f"{top}.")]:
            del sys.modules[name]


@contextlib.contextmanager
def on_sys_path(base_dir: Path) -> Iterator[None]:
    """The spec's folder first on sys.path for the duration (user modules, classes named in pickles)."""
    sys.path.insert(0, str(base_dir.resolve()))
    try:
        yield
    finally:
        sys.path.remove(str(base_dir.resolve()))


def import_object(ref: str, base_dir: Path) -> Any:
    """Import `package.module:name` with `base_dir` first on sys.path; ModelLoadError if it fails."""
    module_name, _, attr = ref.partition(":")
    base_dir = base_dir.resolve()
    forget_shadowed(module_name.split(".")[0], base_dir)
    try:
        with on_sys_path(base_dir):
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import {module_name!r} (from {base_dir}): {exc}") from None
    except Exception as exc:  # the user's module raised while importing
        raise ModelLoadError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ModelLoadError(f"module {module_name!r} has no attribute {attr!r}") from None
