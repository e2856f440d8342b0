"""Rich rendering for the CLI: progress bars and result tables."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from shipyard.artifact.manifest import Manifest
from shipyard.cli._common import out, print_json
from shipyard.pipeline.step import Progress as StepProgress
from shipyard.registry.local import VersionRecord


class _TaskProgress:
    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress, self._task = progress, task

    def update(self, completed: float, total: float) -> None:
        self._progress.update(self._task, completed=completed, total=total)


class RichReporter:
    """Draws one progress line per pipeline step."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<28}"),
            BarColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[StepProgress]:
        task = self.progress.add_task(description, total=None)
        try:
            yield _TaskProgress(self.progress, task)
        except BaseException:
            self.progress.update(task, description=f"[red]✗ {description}[/]")
            self.progress.stop_task(task)
            raise
        total = self.progress.tasks[task].total or 1
        self.progress.update(task, completed=total, total=total)


def human_bytes(size: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    step = 0
    while size >= 1024 and step < len(units) - 1:
        size, step = size / 1024, step + 1
    return f"{size:.0f} B" if step == 0 else f"{size:.1f} {units[step]}"


_METRIC_LABELS = {
    "max_abs_error": ("ONNX vs original: max abs error", "{:.2e}"),
    "max_rel_error": ("ONNX vs original: max rel error", "{:.2e}"),
    "latency_p50_ms": ("latency p50, batch 1", "{:.3f} ms"),
    "latency_p99_ms": ("latency p99, batch 1", "{:.3f} ms"),
    "throughput_sps": ("throughput", "{:,.0f} samples/s"),
    "parameters": ("parameters", "{:,.0f}"),
}


def manifest_table(manifest: Manifest) -> Table:
    """The result table printed after a build and by `models show`."""
    table = Table(title=f"{manifest.name}:{manifest.version}", show_header=True, title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    quality = manifest.spec.get("evaluation") if manifest.spec else None
    metric = quality["metric"]["name"] if quality else None
    if metric and metric in manifest.metrics:
        table.add_row(f"{metric} (ONNX)", f"{manifest.metrics[metric]:.4f}")
        if f"{metric}_original" in manifest.metrics:
            table.add_row(f"{metric} (original)", f"{manifest.metrics[f'{metric}_original']:.4f}")
    for key, (label, fmt) in _METRIC_LABELS.items():
        if key in manifest.metrics:
            value = manifest.metrics[key]
            if key == "throughput_sps":
                label = f"throughput, batch {manifest.metrics.get('throughput_batch', 1):.0f}"
            table.add_row(label, fmt.format(value))
    table.add_row("size", human_bytes(manifest.size_bytes))
    for kind, tensors in (("input", manifest.served_signature.inputs), ("output", manifest.served_signature.outputs)):
        for t in tensors:
            table.add_row(f"{kind} {t.name}", escape(f"{t.dtype} [{', '.join(map(str, t.shape))}]"))
    convert = next((s for s in manifest.lineage if s.step == "convert"), None)
    if convert is not None:
        how = convert.params.get("exporter") or convert.params.get("converter")
        opset = convert.params.get("opset")
        table.add_row("converted with", f"{how}" + (f", opset {opset}" if opset else ""))
    table.add_row("lineage", " → ".join(f"{s.step} {s.seconds:.1f}s" for s in manifest.lineage))
    table.add_row("content hash", manifest.content_hash[:23] + "…")
    return table


def show_manifest(manifest: Manifest, as_json: bool) -> None:
    """A manifest as JSON (for scripts) or as the result table."""
    if as_json:
        print_json(manifest.model_dump(mode="json"))
    else:
        out.print(manifest_table(manifest))


def versions_table(records: list[VersionRecord]) -> Table:
    table = Table(show_header=True)
    for column in ("model", "version", "aliases", "size", "created", "content hash"):
        table.add_column(column, justify="right" if column in ("version", "size") else "left")
    for r in records:
        table.add_row(r.name, str(r.version), ", ".join(r.aliases), human_bytes(r.size), r.created_at,
                      r.content_hash[:19] + "…")  # fmt: skip
    return table


def diff_table(left: str, right: str, rows: list[tuple[str, str, str]]) -> Table:
    table = Table(show_header=True)
    table.add_column("field")
    table.add_column(left)
    table.add_column(right)
    for row in rows:
        table.add_row(*row)
    return table
