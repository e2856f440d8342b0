"""What the command modules share: the consoles, the common options, and the settings read at start."""

from __future__ import annotations

import json

import typer
from rich.console import Console

from shipyard.registry import LocalRegistry, open_registry
from shipyard.settings import REGISTRY_ENV, Environment

out = Console()
err = Console(stderr=True)

RegistryOption = typer.Option(
    None, "--registry", "-r", help=f"Registry folder (default: ${REGISTRY_ENV}, else ~/.shipyard/registry)."
)
JsonOption = typer.Option(False, "--json", help="Print JSON instead of a table (for scripts).")


def environment() -> Environment:
    """The environment settings, read when a command starts (each command calls this once)."""
    return Environment.from_environ()


def registry_at(option: str | None, env: Environment | None = None) -> LocalRegistry:
    """The registry a command works on: --registry, else $SHIPYARD_REGISTRY, else the default folder."""
    return open_registry(option or (env or environment()).registry)


def print_json(data: object) -> None:
    # Plain print: rich would wrap long lines and insert markup-escaped characters.
    print(json.dumps(data, indent=2, sort_keys=True))
