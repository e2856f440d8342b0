"""What the command modules share: the consoles and the common options."""

from __future__ import annotations

import json

import typer
from rich.console import Console

from shipyard.registry import ENV_VAR

out = Console()
err = Console(stderr=True)

RegistryOption = typer.Option(
    None, "--registry", "-r", help=f"Registry folder (default: ${ENV_VAR}, else ~/.shipyard/registry)."
)
JsonOption = typer.Option(False, "--json", help="Print JSON instead of a table (for scripts).")


def print_json(data: object) -> None:
    # Plain print: rich would wrap long lines and insert markup-escaped characters.
    print(json.dumps(data, indent=2, sort_keys=True))
