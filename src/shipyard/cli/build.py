"""The build commands: init, schema, build, import, report, version."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import typer

from shipyard import __version__
from shipyard.artifact.manifest import Manifest
from shipyard.cli._common import JsonOption, RegistryOption, environment, err, print_json, registry_at
from shipyard.cli._render import RichReporter, show_manifest
from shipyard.errors import ConflictError, NotFoundError

app = typer.Typer()
# Every folder under examples/ (a new one is offered without touching this file).
EXAMPLES = tuple(sorted(
    entry.name for entry in resources.files("shipyard").joinpath("examples").iterdir()
    if entry.is_dir() and not entry.name.startswith(("_", "."))
))  # fmt: skip


@app.command()
def version() -> None:
    """Print Shipyard's version."""
    print(__version__)


@app.command()
def init(
    directory: Path = typer.Argument(Path("."), help="Folder to write into (created if missing)."),
    example: str | None = typer.Option(None, "--example", help=f"Bundled example to write: {', '.join(EXAMPLES)}."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
) -> None:
    """Write a commented starter shipyard.yaml, or a complete bundled example."""
    if example is not None and example not in EXAMPLES:
        raise NotFoundError(f"no bundled example {example!r}; choose one of: {', '.join(EXAMPLES)}")
    package = resources.files("shipyard")
    if example is None:
        sources = [package.joinpath("spec/starter.yaml")]
        names = ["shipyard.yaml"]
    else:
        folder = package.joinpath(f"examples/{example}")
        sources = sorted((f for f in folder.iterdir() if f.is_file() and not f.name.endswith(".pyc")), key=str)
        names = [f.name for f in sources]
    clashes = [n for n in names if (directory / n).exists()]
    if clashes and not force:
        raise ConflictError(f"{directory}: {', '.join(clashes)} already exist; use --force to overwrite")
    directory.mkdir(parents=True, exist_ok=True)
    for source, name in zip(sources, names, strict=True):
        (directory / name).write_bytes(source.read_bytes())
    err.print(f"[green]wrote[/] {', '.join(names)} to {directory}")
    if example is not None:
        err.print(f"next: python {directory / 'train.py'} && shipyard build {directory / 'shipyard.yaml'}")


@app.command()
def schema() -> None:
    """Print the JSON Schema of shipyard.yaml (for editor completion)."""
    from shipyard.spec import json_schema

    print_json(json_schema())


@app.command()
def build(
    spec: Path = typer.Argument(Path("shipyard.yaml"), help="The spec file (or its folder)."),
    registry: str | None = RegistryOption,
    as_json: bool = JsonOption,
) -> None:
    """Load, convert, verify, evaluate (and optimize) a model, then register it as a new version."""
    from shipyard.pipeline import build as run_build
    from shipyard.spec import load_spec

    env = environment()
    loaded = load_spec(spec)
    reg = registry_at(registry, env)
    reporter = RichReporter(err)
    key = env.encryption_key()
    with reporter.progress:
        manifest = run_build(loaded, reg, reporter, encryption_key=key)
    show_manifest(manifest, as_json)
    err.print(f"[green]registered[/] {manifest.name}:{manifest.version} in {reg.root}")
    if loaded.spec.optimize is not None:
        written = _write_report(manifest, loaded.base_dir / "reports")
        err.print(f"optimization report: {written}")


@app.command("import")
def import_(
    file: Path = typer.Argument(..., help="An .onnx file."),
    name: str = typer.Option(..., "--name", "-n", help="Registry name for the model."),
    registry: str | None = RegistryOption,
    as_json: bool = JsonOption,
) -> None:
    """Register an ONNX file as it is: signature read from the graph, checked and timed."""
    from shipyard.pipeline import import_onnx

    env = environment()
    reg = registry_at(registry, env)
    reporter = RichReporter(err)
    key = env.encryption_key()
    with reporter.progress:
        manifest = import_onnx(file, name, reg, reporter, encryption_key=key)
    show_manifest(manifest, as_json)
    err.print(f"[green]registered[/] {manifest.name}:{manifest.version} in {reg.root}")


def _write_report(manifest: Manifest, folder: Path) -> Path:
    from shipyard.pipeline.optimize.report import html_page, markdown

    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{manifest.name}-{manifest.version}"
    stem.with_suffix(".md").write_text(markdown(manifest), encoding="utf-8")
    page = stem.with_suffix(".html")
    page.write_text(html_page(manifest), encoding="utf-8")
    return page


@app.command()
def report(
    ref: str = typer.Argument(..., help="NAME:VERSION built with an optimize section."),
    out: Path | None = typer.Option(None, "--out", help="Folder for NAME-VERSION.md and .html (else: print markdown)."),
    registry: str | None = RegistryOption,
) -> None:
    """Regenerate the optimization report of a version: every candidate, why it was kept or rejected."""
    from shipyard.pipeline.optimize.report import markdown

    manifest = registry_at(registry).manifest(ref)
    if out is None:
        print(markdown(manifest))
        return
    err.print(f"[green]wrote[/] {_write_report(manifest, out)} (and .md)")
