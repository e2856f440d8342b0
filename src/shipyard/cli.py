"""The `shipyard` command: parse arguments, call the library, render results."""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path

import typer
from rich.markup import escape

from shipyard import __version__, cli_deploy, cli_operate, cli_security
from shipyard._cli_common import JsonOption, RegistryOption, err, out, print_json
from shipyard._render import RichReporter, diff_table, manifest_table, versions_table
from shipyard.artifact.diff import diff_manifests
from shipyard.artifact.manifest import Manifest
from shipyard.errors import ConflictError, ErrorKind, InvalidInputError, NotFoundError, ShipyardError
from shipyard.registry import open_registry
from shipyard.registry import remote as remote_storage

app = typer.Typer(
    name="shipyard",
    help="From a trained model file to a production inference service, in one declarative spec.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Inspect and manage registered model versions.", no_args_is_help=True)
app.add_typer(models_app, name="models")
cli_deploy.register(app)
cli_security.register(app)
cli_operate.register(app)

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
}
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

    loaded = load_spec(spec)
    reg = open_registry(registry)
    reporter = RichReporter(err)
    with reporter.progress:
        manifest = run_build(loaded, reg, reporter)
    _show_manifest(manifest, as_json)
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

    reg = open_registry(registry)
    reporter = RichReporter(err)
    with reporter.progress:
        manifest = import_onnx(file, name, reg, reporter)
    _show_manifest(manifest, as_json)
    err.print(f"[green]registered[/] {manifest.name}:{manifest.version} in {reg.root}")


def _show_manifest(manifest: Manifest, as_json: bool) -> None:
    if as_json:
        print_json(manifest.model_dump(mode="json"))
    else:
        out.print(manifest_table(manifest))


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

    manifest = open_registry(registry).manifest(ref)
    if out is None:
        print(markdown(manifest))
        return
    err.print(f"[green]wrote[/] {_write_report(manifest, out)} (and .md)")


@models_app.command("list")
def models_list(
    name: str | None = typer.Argument(None, help="Only this model's versions."),
    registry: str | None = RegistryOption,
    as_json: bool = JsonOption,
) -> None:
    """List registered versions."""
    reg = open_registry(registry)
    records = reg.versions(name) if name else reg.all_versions()
    if as_json:
        print_json([{**r.__dict__, "aliases": list(r.aliases)} for r in records])
    elif not records:
        err.print(f"no models in {reg.root}")
    else:
        out.print(versions_table(records))


@models_app.command("show")
def models_show(
    ref: str = typer.Argument(..., help="NAME, NAME:VERSION or NAME@ALIAS."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash every file against the manifest."),
    registry: str | None = RegistryOption,
    as_json: bool = JsonOption,
) -> None:
    """Show one version's manifest."""
    manifest = open_registry(registry).manifest(ref, verify=verify)
    _show_manifest(manifest, as_json)
    if verify:
        err.print(f"[green]verified[/] {len(manifest.files)} file(s) against their sha256")


@models_app.command("diff")
def models_diff(
    left: str = typer.Argument(..., help="First version reference."),
    right: str = typer.Argument(..., help="Second version reference."),
    registry: str | None = RegistryOption,
    as_json: bool = JsonOption,
) -> None:
    """Show what differs between two versions."""
    reg = open_registry(registry)
    rows = diff_manifests(reg.manifest(left), reg.manifest(right))
    if as_json:
        print_json([{"field": f, "left": a, "right": b} for f, a, b in rows])
    elif not rows:
        err.print("no differences")
    else:
        out.print(diff_table(left, right, rows))


@models_app.command("rm")
def models_rm(
    ref: str = typer.Argument(..., help="NAME:VERSION, NAME@ALIAS, or NAME for every version."),
    force: bool = typer.Option(False, "--force", help="Also remove aliased versions (and their aliases)."),
    registry: str | None = RegistryOption,
) -> None:
    """Remove versions."""
    removed = open_registry(registry).remove(ref, force=force)
    err.print(f"[green]removed[/] {', '.join(r.ref for r in removed)}")


@models_app.command("alias")
def models_alias(
    ref: str = typer.Argument(..., help="NAME:VERSION (or NAME for the latest) to point the alias at."),
    alias: str = typer.Argument(..., help="Alias, e.g. production or staging."),
    delete: bool = typer.Option(False, "--delete", help="Remove the alias instead."),
    registry: str | None = RegistryOption,
) -> None:
    """Point an alias (production, staging, …) at a version, or delete it."""
    reg = open_registry(registry)
    if delete:
        name = ref.split(":")[0].split("@")[0]
        reg.remove_alias(name, alias)
        err.print(f"[green]removed alias[/] {name}@{alias}")
        return
    record = reg.set_alias(ref, alias)
    err.print(f"[green]{record.name}@{alias}[/] → {record.ref}")


@app.command()
def push(
    ref: str = typer.Argument(..., help="Version to upload."),
    uri: str = typer.Argument(..., help="Target: a file URI, or a folder URI ending in '/' (file://, s3://, …)."),
    registry: str | None = RegistryOption,
) -> None:
    """Upload a version as a single-file archive (with a .sha256 sidecar) to a storage URI."""
    target = remote_storage.push(open_registry(registry), ref, uri)
    err.print(f"[green]pushed[/] {ref} to {target}")
    print(target)


@app.command()
def pull(
    uri: str = typer.Argument(..., help="Archive URI written by `shipyard push`."),
    registry: str | None = RegistryOption,
) -> None:
    """Download an archive, verify it, and register it as a new local version."""
    manifest = remote_storage.pull(open_registry(registry), uri)
    err.print(f"[green]pulled[/] {uri} as {manifest.name}:{manifest.version}")
    print(f"{manifest.name}:{manifest.version}")


@app.command()
def serve(
    models: list[str] = typer.Argument(None, help="NAME, NAME:VERSION or NAME@ALIAS to serve (default: every model)."),
    registry: str | None = RegistryOption,
    host: str = typer.Option("127.0.0.1", "--host", envvar="SHIPYARD_HOST", help="Address to listen on."),
    http_port: int = typer.Option(8000, "--http-port", envvar="SHIPYARD_HTTP_PORT", help="REST port."),
    grpc_port: int = typer.Option(8001, "--grpc-port", envvar="SHIPYARD_GRPC_PORT", help="gRPC port."),
    metrics_port: int = typer.Option(
        8002, "--metrics-port", envvar="SHIPYARD_METRICS_PORT", help="Prometheus metrics port (0: off)."
    ),
    max_body_mb: float = typer.Option(64, "--max-body-mb", help="Largest request body accepted (413 above)."),
    pull_uris: list[str] = typer.Option(
        [], "--pull", help="Archive URI to pull (verified) into the registry before serving; repeatable."
    ),
    require_signed: bool = typer.Option(
        False, "--require-signed", help="Serve only versions signed for --public-key; refuse (and report) others."
    ),
    public_key: Path | None = typer.Option(None, "--public-key", help="Public key (PEM) signatures must match."),
    tokens: Path | None = typer.Option(None, "--tokens", help="Token file (shipyard token add): require tokens."),
    auth_health: bool = typer.Option(False, "--auth-health", help="Require a token on the health endpoints too."),
    allow_management: bool = typer.Option(False, "--allow-management", help="Enable repository load/unload."),
    rate_limit: float | None = typer.Option(None, "--rate-limit", help="Requests/s per caller (429 above)."),
    rate_burst: int = typer.Option(50, "--rate-burst", help="Requests a caller may send at once."),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="PEM certificate (chain): HTTPS and gRPC TLS."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="PEM private key for --tls-cert."),
    request_timeout: float = typer.Option(60, "--request-timeout", help="Seconds per request (504 after; 0: none)."),
    max_elements: int = typer.Option(1 << 26, "--max-elements", help="Largest input tensor, in elements (413 above)."),
    canary: list[str] = typer.Option([], "--canary", help="NAME:VERSION=PERCENT of versionless requests; repeatable."),
    shadow: list[str] = typer.Option([], "--shadow", help="NAME:VERSION=PERCENT mirrored, compared, not returned."),
    drift_sample: float = typer.Option(0.1, "--drift-sample", help="Share of requests binned for drift (0: off)."),
    log_requests: Path | None = typer.Option(None, "--log-requests", help="Folder for sampled request JSON lines."),
    log_sample: float = typer.Option(0.01, "--log-sample", help="Share of requests logged."),
    log_max_mb: float = typer.Option(10, "--log-max-mb", help="Rotate the log file at this size."),
    log_redact: bool = typer.Option(False, "--log-redact", help="Log shapes and hashes only, no tensor values."),
) -> None:
    """Serve registry versions over the Open Inference Protocol (REST + gRPC) with dynamic batching."""
    import asyncio
    import logging

    from shipyard.serve.rollout import parse_rules
    from shipyard.serve.server import ServeSettings, run

    if require_signed and public_key is None:
        raise InvalidInputError("--require-signed needs --public-key: the key signatures must match")
    if (tls_cert is None) != (tls_key is None):
        raise InvalidInputError("--tls-cert and --tls-key go together")
    reg = open_registry(registry)
    for uri in pull_uris:
        pulled = remote_storage.pull(reg, uri)
        err.print(f"pulled {uri} as {pulled.name}:{pulled.version}")
    refs = list(models or []) or reg.models()
    if not refs:
        raise NotFoundError(f"no models to serve in {reg.root}")
    settings = ServeSettings(
        models=refs, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
        max_body_bytes=int(max_body_mb * (1 << 20)), trusted_key=public_key if require_signed else None,
        tokens_file=tokens, allow_management=allow_management, open_health=not auth_health, rate_limit=rate_limit,
        rate_burst=rate_burst, tls_cert=tls_cert, tls_key=tls_key, request_timeout_s=request_timeout or None,
        max_elements=max_elements, canary=parse_rules(canary, "canary"), shadow=parse_rules(shadow, "shadow"),
        drift_sample=drift_sample, log_dir=log_requests, log_sample=log_sample,
        log_max_bytes=int(log_max_mb * (1 << 20)), log_redact=log_redact,
    )  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        uvloop.run(run(settings, reg))
    except ImportError:
        asyncio.run(run(settings, reg))


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
    except Exception as exc:
        if os.environ.get("SHIPYARD_DEBUG"):
            raise
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}", soft_wrap=True)
        err.print("set SHIPYARD_DEBUG=1 for the traceback and report it as a bug")
        sys.exit(1)
