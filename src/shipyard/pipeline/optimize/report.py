"""The optimization report of a registered version: markdown, and a standalone HTML page with plots.

Everything comes from the manifest (the candidates are in the optimize step's lineage), so the report
can be regenerated at any time with `shipyard report NAME:VERSION`.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from shipyard._extras import require
from shipyard.artifact.manifest import Manifest
from shipyard.errors import InvalidInputError


def _optimize_record(manifest: Manifest) -> dict[str, Any]:
    for step in manifest.lineage:
        if step.step == "optimize":
            return step.params
    raise InvalidInputError(f"{manifest.name}:{manifest.version} was built without an `optimize:` section")


def _metric_name(manifest: Manifest) -> str:
    evaluation = (manifest.spec or {}).get("evaluation") or {}
    return str((evaluation.get("metric") or {}).get("name", "metric"))


def _fmt(value: Any, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def rows(manifest: Manifest) -> list[list[str]]:
    """One row per candidate: trial, step, kept in float, verdict, metric, loss bound, p50, parent p50, size."""
    out = []
    for c in _optimize_record(manifest)["candidates"]:
        params = {k: v for k, v in c["params"].items() if k != "nodes_to_exclude"}
        step = f"{c['step']} {params}" if params else c["step"]
        out.append([
            str(c["trial"]), step, ", ".join(c.get("fallback") or []) or "—",
            "accepted" if c["accepted"] else "rejected", _fmt(c.get("metric"), "{:.4f}"),
            _fmt(c.get("drop_bound"), "{:.4f}"), _fmt(c.get("p50_ms"), "{:.3f}"),
            _fmt(c.get("parent_p50_ms"), "{:.3f}"), _fmt(c.get("size_bytes"), "{:,}"), c["reason"],
        ])  # fmt: skip
    return out


HEADER = ["trial", "step", "kept in float", "verdict", "metric", "loss bound", "p50 ms", "parent p50 ms", "bytes",
          "reason"]  # fmt: skip


def _summary(manifest: Manifest) -> list[tuple[str, str, str]]:
    metric, m = _metric_name(manifest), manifest.metrics
    pairs = [
        (metric, "{:.4f}"),
        ("latency_p50_ms", "{:.3f} ms"),
        ("throughput_sps", "{:,.0f}/s"),
        ("size_bytes", "{:,.0f}"),
    ]
    return [(key, _fmt(m.get(f"{key}_unoptimized", m.get(key)), fmt), _fmt(m.get(key), fmt)) for key, fmt in pairs]


def markdown(manifest: Manifest) -> str:
    record = _optimize_record(manifest)
    applied = " → ".join(a["step"] for a in record["applied"]) or "none (the unoptimized model was kept)"
    budget = record["budget"]
    timed_at = f" Candidates timed at batch {budget.get('speed_batch', 1)} (p50, paired with their parent)."
    lines = [
        f"# Optimization report: {manifest.name}:{manifest.version}",
        "",
        f"Applied: {applied}. Budget: {_metric_name(manifest)} loss ≤ {budget['max_drop']}"
        f"{' (relative)' if budget['relative'] else ''} at {budget['confidence']:.0%} confidence (bootstrap bound)."
        + timed_at,
        "",
        "| measure | unoptimized | registered |",
        "|---|---:|---:|",
        *[f"| {k} | {a} | {b} |" for k, a, b in _summary(manifest)],
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
        *["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows(manifest)],
        "",
    ]
    return "\n".join(lines)


def _plots(manifest: Manifest) -> str:
    """Metric vs latency (with the Pareto front of accepted models) and size per candidate, as PNG images."""
    matplotlib = require("matplotlib", "report", "Plots in the HTML report")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "report", "Plots in the HTML report")
    candidates = _optimize_record(manifest)["candidates"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    timed = [c for c in candidates if c.get("p50_ms") is not None]
    for c in timed:
        left.scatter(c["p50_ms"], c["metric"], color="tab:green" if c["accepted"] else "tab:red")
        left.annotate(f"{c['trial']}:{c['step']}", (c["p50_ms"], c["metric"]), fontsize=8)
    front = sorted((c["p50_ms"], c["metric"]) for c in timed if c["accepted"])
    if front:
        left.plot(*zip(*front, strict=True), color="tab:green", linewidth=1)
    left.set_xlabel(f"p50 latency, batch {_optimize_record(manifest)['budget'].get('speed_batch', 1)} (ms)")
    left.set_ylabel(_metric_name(manifest))
    left.set_title("metric vs latency (green: accepted)")
    sized = [c for c in candidates if c.get("size_bytes")]
    right.bar([f"{c['trial']}:{c['step']}" for c in sized], [c["size_bytes"] / 1024 for c in sized],
              color=["tab:green" if c["accepted"] else "tab:gray" for c in sized])  # fmt: skip
    right.set_ylabel("KiB")
    right.set_title("model size per candidate")
    right.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def html_page(manifest: Manifest) -> str:
    """A standalone page (inline CSS and images) for browsers and CI artifacts."""
    esc = html.escape
    summary = "".join(f"<tr><td>{esc(k)}</td><td>{esc(a)}</td><td>{esc(b)}</td></tr>" for k, a, b in _summary(manifest))
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADER)
    body = "".join(
        f"<tr class='{'ok' if row[3] == 'accepted' else 'no'}'>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
        for row in rows(manifest)
    )
    title = esc(f"Optimization report: {manifest.name}:{manifest.version}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}
tr.ok{{background:#e9f7ec}}tr.no{{background:#fbeaea}}</style>
</head><body><h1>{title}</h1>
<table><tr><th>measure</th><th>unoptimized</th><th>registered</th></tr>{summary}</table>
<img alt="metric vs latency and size per candidate" src="data:image/png;base64,{_plots(manifest)}">
<table><tr>{head}</tr>{body}</table>
</body></html>
"""
