"""The deployment commands: plan, apply (deploy), rollback, status, stop, capacity."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from shipyard.cli._common import JsonOption, RegistryOption, environment, err, out, print_json, registry_at

if TYPE_CHECKING:
    from shipyard.deploy.apply import Outcome
    from shipyard.deploy.releases import Plan

SpecArgument = typer.Argument(Path("shipyard.yaml"), help="The spec file (or its folder).")
app = typer.Typer()
TargetOption = typer.Option(
    None, "--target", "-t", help="local, docker, kubernetes, kserve or ray (default: deploy.target)"
)


def _show_plan(plan: Plan) -> None:
    current = f"release {plan.current.number}" if plan.current else "nothing deployed"
    if plan.empty:
        err.print(f"[green]no changes[/]: target {plan.target} matches the spec ({current})")
        return
    err.print(f"target {plan.target}: changes against {current}")
    for name, before, after in plan.models:
        out.print(f"  model {escape(name)}: version {before} → {after}")
    for change in plan.changes:
        colour = {"add": "green", "remove": "red", "change": "yellow"}[change.action]
        added = sum(1 for line in change.diff[2:] if line.startswith("+"))
        removed = sum(1 for line in change.diff[2:] if line.startswith("-"))
        counts = f"+{added} -{removed}" if change.action == "change" else f"{added or removed} lines"
        out.print(f"  [{colour}]{change.action:6}[/] {escape(change.path)} ({counts})")
        if change.action != "change":
            continue  # a new or removed file's every line is noise; `apply` writes it for reading
        for line in change.diff[2:]:
            style = "green" if line.startswith("+") else "red" if line.startswith("-") else "dim"
            out.print(f"      [{style}]{escape(line)}[/]", highlight=False)


@app.command()
def plan(spec: Path = SpecArgument, target: str | None = TargetOption, registry: str | None = RegistryOption) -> None:
    """Show what `apply` would change: rendered files (as a diff) and pinned model versions."""
    from shipyard.deploy.apply import plan as make_plan
    from shipyard.spec import load_spec

    _show_plan(make_plan(load_spec(spec), registry_at(registry), target))


@app.command("apply")
def apply_(spec: Path = SpecArgument, target: str | None = TargetOption, registry: str | None = RegistryOption) -> None:
    """Converge the target to the spec as a new numbered release (nothing changes if it already matches)."""
    from shipyard.deploy.apply import apply
    from shipyard.spec import load_spec

    loaded = load_spec(spec)
    env = environment()
    outcome = apply(loaded, registry_at(registry, env), target, env.storage_schemes)
    _show_plan(outcome.plan)
    _report(loaded.base_dir / loaded.spec.deploy.output, outcome)


@app.command()
def deploy(spec: Path = SpecArgument, target: str | None = TargetOption, registry: str | None = RegistryOption) -> None:
    """Deploy the spec's models to a target (the same as `apply`)."""
    apply_(spec, target, registry)


@app.command()
def promote(
    ref: str = typer.Argument(..., help="NAME:VERSION (or NAME@ALIAS) to promote."),
    alias: str = typer.Option("production", "--to", help="Alias to point at it."),
    registry: str | None = RegistryOption,
) -> None:
    """Point an alias (production by default) at a version; `rollback NAME@ALIAS` undoes it."""
    record = registry_at(registry).set_alias(ref, alias)
    err.print(f"[green]{record.name}@{alias}[/] → {record.ref}")


@app.command()
def rollback(
    what: str | None = typer.Argument(
        None, help="NAME@ALIAS: move the alias back; or a release number (default: the previous release)."
    ),
    spec: Path = typer.Option(Path("shipyard.yaml"), "--spec", help="The spec file (or its folder)."),
    target: str | None = TargetOption,
    registry: str | None = RegistryOption,
) -> None:
    """Move an alias back to the version it named before, or apply an earlier deploy release again."""
    from shipyard.deploy.apply import rollback as run_rollback
    from shipyard.errors import InvalidInputError
    from shipyard.spec import load_spec

    if what is not None and "@" in what:
        name, _, alias = what.partition("@")
        record = registry_at(registry).roll_back_alias(name, alias)
        err.print(f"[green]{name}@{alias}[/] → {record.ref}")
        return
    if what is not None and not what.isdigit():
        raise InvalidInputError(f"rollback {what!r}: give NAME@ALIAS or a release number")
    loaded = load_spec(spec)
    env = environment()
    number = int(what) if what else None
    outcome = run_rollback(loaded, registry_at(registry, env), number, target, env.storage_schemes)
    _show_plan(outcome.plan)
    _report(loaded.base_dir / loaded.spec.deploy.output, outcome)


@app.command()
def status(spec: Path = SpecArgument, as_json: bool = JsonOption) -> None:
    """The local service (pid, ports, models, readiness) and the current release of each target."""
    from shipyard.deploy.apply import status as read_status
    from shipyard.spec import load_spec

    state = read_status(load_spec(spec))
    if as_json:
        print_json(state)
        return
    local = state["local"]
    if isinstance(local, dict):
        health = "[green]ready[/]" if local["ready"] else "[yellow]not ready[/]"
        if not local["supervised"]:
            health += " [red](its supervisor died: a crash would not be restarted; `shipyard stop` stops it)[/]"
        out.print(f"local service: {health}, release {local['release']}, pid {local['supervisor_pid']}, "
                  f"http port {local['http_port']}, models {', '.join(local['models'])}")  # fmt: skip
    else:
        out.print("local service: not running")
    releases = state["releases"]
    assert isinstance(releases, dict)
    for name, number in releases.items():
        out.print(f"{name}: release {number}")


@app.command()
def stop(spec: Path = SpecArgument) -> None:
    """Stop the local service (it drains in-flight requests first)."""
    from shipyard.deploy.apply import local_service
    from shipyard.spec import load_spec

    stopped = local_service(load_spec(spec)).stop()
    err.print("[green]stopped[/] the local service" if stopped else "the local service was not running")


def _milliseconds(value: str) -> float:
    """`50ms`, `0.05s` or a bare number of milliseconds."""
    text = value.strip().lower()
    try:
        if text.endswith("ms"):
            return float(text[:-2])
        if text.endswith("s"):
            return float(text[:-1]) * 1000
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a duration such as 50ms or 0.05s") from None


@app.command()
def capacity(
    ref: str = typer.Argument(..., help="NAME, NAME:VERSION or NAME@ALIAS."),
    qps: float = typer.Option(..., "--qps", help="Requests per second to serve."),
    p99: str = typer.Option(..., "--p99", help="Latency target at the 99th percentile, e.g. 50ms."),
    utilization: float = typer.Option(0.5, "--utilization", help="Share of measured capacity to plan for."),
    max_batch: int = typer.Option(64, "--max-batch", help="Largest batch size to consider."),
    sequence: int | None = typer.Option(
        None, "--sequence", help="Length of dynamic non-batch dimensions (default: a text model's max_length, else 8)."
    ),
    spec: Path | None = typer.Option(None, "--spec", help="Save the plan for this spec: `apply` sizes from it."),
    registry: str | None = RegistryOption,
    as_json: bool = JsonOption,
) -> None:
    """Measure the model here (batch sizes x concurrency) and size replicas, CPU, memory and batching."""
    from dataclasses import asdict

    from rich.table import Table

    from shipyard.deploy.capacity import machine_fit, misfit, plan_capacity, save_plan
    from shipyard.spec import load_spec

    loaded = load_spec(spec) if spec is not None else None
    with err.status("measuring latency and throughput curves…"):
        env = environment()
        result = plan_capacity(registry_at(registry, env), ref, qps, _milliseconds(p99), utilization, max_batch,
                               encryption_key=env.encryption_key(), sequence=sequence)  # fmt: skip
    if loaded is not None:
        err.print(f"saved the plan to {save_plan(result, loaded)}: apply sizes resources and replicas from it")
        problem = misfit(result, loaded)
        if problem is not None:
            err.print(f"[yellow]warning:[/] {escape(problem)}")
    fit = machine_fit(result, loaded) if loaded is not None else None
    if fit is not None and not fit.per_machine:
        err.print(f"[yellow]warning:[/] {escape(result.model)} does not fit {escape(fit.machine)}: one replica needs "
                  f"{fit.bound} {escape(fit.needs)}")  # fmt: skip
    if as_json:
        print_json({**result.to_dict(), "machine": asdict(fit) if fit is not None else None})
        return
    shapes = ", ".join(f"{name} [{', '.join(map(str, shape))}]" for name, shape in result.inputs.items())
    table = Table(title=escape(f"{result.model} on this machine (ONNX Runtime, 1 thread per session; inputs {shapes})"))
    for column in ("batch", "sessions", "p50 ms", "p99 ms", "samples/s"):
        table.add_column(column, justify="right")
    for point in result.curve:
        table.add_row(str(point.batch), str(point.concurrency), f"{point.p50_ms:.3f}", f"{point.p99_ms:.3f}",
                      f"{point.samples_per_s:,.0f}")  # fmt: skip
    out.print(table)
    out.print(
        f"for {result.qps:g} QPS at p99 ≤ {result.p99_target_ms:g} ms: [bold]{result.replicas} replica(s)[/], "
        f"cpu {result.cpu}, memory {result.memory} each (peak RSS measured {result.peak_rss_mib:.0f} MiB, "
        f"the server's estimate {result.estimate_mib:.0f} MiB)\n"
        f"batching: max_batch_size {result.batch}, max_queue_delay_ms {result.max_queue_delay_ms:g}; "
        f"one replica does {result.per_replica_qps:,.0f} samples/s, expected p99 {result.expected_p99_ms:g} ms "
        f"(model time: queue + batch)\nheadroom: {result.headroom:.0%} over the target at "
        f"{result.utilization:.0%} planned utilisation (the rest absorbs transport cost and bursts)"
    )
    if fit is not None and fit.per_machine:
        out.print(f"on {escape(fit.machine)}: {fit.per_machine} replica(s) per machine (bound by {fit.bound}: "
                  f"{escape(fit.needs)}), {fit.machines} machine(s) for {result.replicas} replica(s)")  # fmt: skip


def _report(folder: Path, outcome: Outcome) -> None:
    if outcome.release is not None:
        note = f" (rollback to release {outcome.release.rollback_of})" if outcome.release.rollback_of else ""
        err.print(f"[green]applied[/] release {outcome.release.number} to {outcome.release.target}{note}: {folder}")
    if outcome.service is not None:
        err.print(f"local service ready on http://127.0.0.1:{outcome.service.http_port} (log {outcome.service.log})")
