"""The operations commands: gc, validate, backup, restore."""

from __future__ import annotations

from pathlib import Path

import typer

from shipyard.cli._common import RegistryOption, environment, err, out, registry_at

app = typer.Typer()


monitoring_app = typer.Typer(help="Dashboards and alerts for the served metrics.", no_args_is_help=True)
app.add_typer(monitoring_app, name="monitoring")


@monitoring_app.command("export")
def monitoring_export(
    out_dir: Path = typer.Option(Path("monitoring"), "--out", help="Folder for the dashboard and rule files."),
    psi: float = typer.Option(0.2, "--psi", help="Drift alert threshold (population stability index)."),
    p99: float = typer.Option(0.5, "--p99-seconds", help="Latency alert threshold."),
) -> None:
    """Write a Grafana dashboard (JSON) and Prometheus alert rules (YAML) for `shipyard serve` metrics."""
    from shipyard.operate.monitoring import Thresholds, export

    for path in export(out_dir, Thresholds(psi=psi, p99_seconds=p99)):
        err.print(f"[green]wrote[/] {path}")


@app.command()
def replay(
    logs: list[Path] = typer.Argument(..., help="Request log files (requests*.jsonl*) from serve --log-requests."),
    against: str = typer.Option(..., "--against", help="Candidate NAME:VERSION to replay the traffic on."),
    min_agreement: float = typer.Option(0.99, "--min-agreement", help="Exit non-zero below this agreement."),
    registry: str | None = RegistryOption,
) -> None:
    """Replay logged requests on a candidate version: agreement with the served answers, latency."""
    from shipyard.operate.replay import replay as run_replay
    from shipyard.operate.replay import require_agreement

    env = environment()
    report = run_replay(logs, registry_at(registry, env), against, env.encryption_key())
    out.print(f"replayed {report.requests} logged request(s) (served by version {', '.join(report.served_versions)}"
              f"; {report.skipped} redacted skipped) on {report.candidate}:\n"
              f"  agreement {report.agreement:.1%}, largest output difference {report.max_abs_diff:.4g}\n"
              f"  candidate p50 {report.candidate_p50_ms:.3f} ms in process; "
              f"logged server p50 {report.logged_p50_ms:.3f} ms")  # fmt: skip
    require_agreement(report, min_agreement)


@app.command()
def gc(
    keep: int = typer.Option(3, "--keep", min=0, help="Newest versions to keep per model (aliased ones always)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
    registry: str | None = RegistryOption,
) -> None:
    """Remove versions no alias names beyond the newest --keep, and staging left by crashed builds."""
    from shipyard.operate.maintenance import collect_garbage

    versions, staging = collect_garbage(registry_at(registry), keep, dry_run)
    verb = "would remove" if dry_run else "removed"
    for record in versions:
        out.print(f"{verb} {record.ref}")
    err.print(f"{verb} {len(versions)} version(s) and {len(staging)} stale staging folder(s)")


@app.command()
def validate(
    ref: str = typer.Argument(..., help="NAME, NAME:VERSION or NAME@ALIAS (e.g. my-model@production)."),
    spec_dir: Path = typer.Option(Path("."), "--base-dir", help="Folder the spec's dataset paths are relative to."),
    max_drop: float | None = typer.Option(None, "--max-drop", help="Allowed metric drop (default: the spec's)."),
    registry: str | None = RegistryOption,
) -> None:
    """Re-run the version's evaluation; exit non-zero when its metric dropped beyond the budget (cron/CI)."""
    from shipyard.operate.maintenance import validate as run_validate

    env = environment()
    result = run_validate(registry_at(registry, env), ref, spec_dir, max_drop, encryption_key=env.encryption_key())
    out.print(f"[green]valid[/] {result.ref}: {result.metric} {result.now:.4f} (built {result.built:.4f}, "
              f"drop {result.drop:+.4f}, budget {result.budget:g})")  # fmt: skip


@app.command()
def backup(
    uri: str = typer.Argument(..., help="Folder URI (file://, s3://, …)."), registry: str | None = RegistryOption
) -> None:
    """Copy every version (verified archives) and the aliases to a storage folder."""
    from shipyard.operate.maintenance import backup as run_backup

    env = environment()
    written = run_backup(registry_at(registry, env), uri, env.storage_schemes)
    err.print(f"[green]backed up[/] {len(written)} version(s) to {uri}")


@app.command()
def restore(
    uri: str = typer.Argument(..., help="Folder URI a backup was written to."),
    registry: str | None = RegistryOption,
) -> None:
    """Pull every archive of a backup (checked) into the registry and re-create its aliases."""
    from shipyard.operate.maintenance import restore as run_restore

    env = environment()
    records = run_restore(registry_at(registry, env), uri, env.storage_schemes)
    err.print(f"[green]restored[/] {uri}: the registry now holds {len(records)} version(s)")
