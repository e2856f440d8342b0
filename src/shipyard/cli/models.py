"""The registry commands: models list/show/diff/rm/alias, push and pull."""

from __future__ import annotations

import typer

from shipyard.artifact.diff import diff_manifests
from shipyard.cli._common import JsonOption, RegistryOption, environment, err, out, print_json, registry_at
from shipyard.cli._render import diff_table, show_manifest, versions_table
from shipyard.registry import remote as remote_storage

app = typer.Typer()
models_app = typer.Typer(help="Inspect and manage registered model versions.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(
    name: str | None = typer.Argument(None, help="Only this model's versions."),
    registry: str | None = RegistryOption,
    as_json: bool = JsonOption,
) -> None:
    """List registered versions."""
    reg = registry_at(registry)
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
    manifest = registry_at(registry).manifest(ref, verify=verify)
    show_manifest(manifest, as_json)
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
    reg = registry_at(registry)
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
    removed = registry_at(registry).remove(ref, force=force)
    err.print(f"[green]removed[/] {', '.join(r.ref for r in removed)}")


@models_app.command("alias")
def models_alias(
    ref: str = typer.Argument(..., help="NAME:VERSION (or NAME for the latest) to point the alias at."),
    alias: str = typer.Argument(..., help="Alias, e.g. production or staging."),
    delete: bool = typer.Option(False, "--delete", help="Remove the alias instead."),
    registry: str | None = RegistryOption,
) -> None:
    """Point an alias (production, staging, …) at a version, or delete it."""
    reg = registry_at(registry)
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
    env = environment()
    target = remote_storage.push(registry_at(registry, env), ref, uri, env.storage_schemes)
    err.print(f"[green]pushed[/] {ref} to {target}")
    print(target)


@app.command()
def pull(
    uri: str = typer.Argument(..., help="Archive URI written by `shipyard push`."),
    registry: str | None = RegistryOption,
    as_json: bool = typer.Option(False, "--json", help="Print the registered version's manifest as JSON."),
) -> None:
    """Download an archive, verify it, and register it as a new local version."""
    env = environment()
    manifest = remote_storage.pull(registry_at(registry, env), uri, env.storage_schemes)
    err.print(f"[green]pulled[/] {uri} as {manifest.name}:{manifest.version}")
    if as_json:
        print_json(manifest.model_dump(mode="json"))
    else:
        print(f"{manifest.name}:{manifest.version}")
