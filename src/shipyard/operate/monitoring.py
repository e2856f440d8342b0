"""A Grafana dashboard and Prometheus alert rules for the metrics `shipyard serve` exports.

Both are generated from one list of queries, so the dashboard and the alerts never disagree about a
metric's name. Thresholds are parameters with the defaults the docs explain (PSI above 0.2 is a real
shift; a drift alert also needs a full enough window, so a handful of requests cannot page anyone).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

RATE = "sum by (model, version) (rate(shipyard_inference_requests_total[5m]))"
ERRORS = ('sum by (model, version) (rate(shipyard_inference_requests_total{outcome="failure"}[5m])) / '
          "clamp_min(" + RATE + ", 1e-9)")  # fmt: skip
P99 = "histogram_quantile(0.99, sum by (le, model, version) (rate(shipyard_request_duration_seconds_bucket[5m])))"
P50 = "histogram_quantile(0.5, sum by (le, model, version) (rate(shipyard_request_duration_seconds_bucket[5m])))"
BATCH = "histogram_quantile(0.5, sum by (le, model, version) (rate(shipyard_batch_size_bucket[5m])))"
QUEUE = "sum by (model, version) (shipyard_queue_depth)"
FIRST_TOKEN = ("histogram_quantile(0.5, sum by (le, model, version) "
               "(rate(shipyard_time_to_first_token_seconds_bucket[5m])))")  # fmt: skip
TOKENS = "sum by (model, version) (rate(shipyard_generated_tokens_total[5m]))"
INPUT_DRIFT = "max by (model, version, input) (shipyard_input_drift_psi)"
PREDICTION_DRIFT = "max by (model, version) (shipyard_prediction_drift_psi)"
WINDOW = "max by (model, version) (shipyard_drift_window_samples)"
ONLINE = "shipyard_online_metric"
FEEDBACK = "sum by (model, version) (shipyard_feedback_total)"
_SHADOW_RATE = "sum by (model, version) (rate(shipyard_shadow_requests_total{{outcome=~{0}}}[5m]))"
SHADOW = f"{_SHADOW_RATE.format(repr('disagree'))} / clamp_min({_SHADOW_RATE.format(repr('agree|disagree'))}, 1e-9)"


@dataclass(frozen=True)
class Thresholds:
    error_ratio: float = 0.05
    p99_seconds: float = 0.5
    psi: float = 0.2
    min_window: int = 200
    shadow_disagreement: float = 0.1
    accuracy_drop: float = 0.05  # online accuracy this far below the build's
    error_increase: float = 0.5  # online mse/mae this much (relative) above the build's
    min_feedback: int = 50


def _panel(number: int, title: str, expr: str, unit: str, legend: str) -> dict[str, Any]:
    return {
        "id": number,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * ((number - 1) % 2), "y": 8 * ((number - 1) // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": "A", "expr": expr, "legendFormat": legend}],
    }


def dashboard() -> dict[str, Any]:
    """Grafana dashboard JSON (schema 39) over a Prometheus data source chosen at import."""
    panels = [
        ("Requests per second", RATE, "reqps", "{{model}}:{{version}}"),
        ("Error ratio", ERRORS, "percentunit", "{{model}}:{{version}}"),
        ("Latency p50", P50, "s", "{{model}}:{{version}}"),
        ("Latency p99", P99, "s", "{{model}}:{{version}}"),
        ("Queue depth", QUEUE, "short", "{{model}}:{{version}}"),
        ("Batch size p50", BATCH, "short", "{{model}}:{{version}}"),
        ("Input drift (PSI, worst feature)", INPUT_DRIFT, "short", "{{model}}:{{version}} {{input}}"),
        ("Prediction drift (PSI)", PREDICTION_DRIFT, "short", "{{model}}:{{version}}"),
        ("Shadow disagreement", SHADOW, "percentunit", "{{model}}:{{version}}"),
        ("Online metric (from feedback)", ONLINE, "short", "{{model}}:{{version}} {{metric}}"),
        ("Time to first token p50 (language models)", FIRST_TOKEN, "s", "{{model}}:{{version}}"),
        ("Generated tokens per second", TOKENS, "short", "{{model}}:{{version}}"),
    ]
    return {
        "title": "Shipyard model serving",
        "uid": "shipyard-serving",
        "schemaVersion": 39,
        "editable": True,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
        "panels": [_panel(i, *spec) for i, spec in enumerate(panels, start=1)],
    }


def alert_rules(limits: Thresholds | None = None) -> dict[str, Any]:
    """Prometheus alerting rules (the rule-file format `promtool check rules` reads)."""
    t = limits or Thresholds()

    def rule(name: str, expr: str, duration: str, severity: str, summary: str) -> dict[str, Any]:
        return {"alert": name, "expr": expr, "for": duration, "labels": {"severity": severity},
                "annotations": {"summary": summary}}  # fmt: skip

    where = "{{ $labels.model }}:{{ $labels.version }}"
    return {"groups": [{"name": "shipyard", "rules": [
        rule("ShipyardHighErrorRate", f"({ERRORS}) > {t.error_ratio}", "5m", "page",
             where + " fails {{ $value | humanizePercentage }} of requests"),
        rule("ShipyardHighLatencyP99", f"({P99}) > {t.p99_seconds}", "10m", "page",
             where + " p99 latency is {{ $value | humanizeDuration }}"),
        rule("ShipyardInputDrift", f"({INPUT_DRIFT}) > {t.psi} and on (model, version) ({WINDOW}) >= {t.min_window}",
             "10m", "ticket", where + " input {{ $labels.input }} drifted (PSI {{ $value }})"),
        rule("ShipyardPredictionDrift",
             f"({PREDICTION_DRIFT}) > {t.psi} and on (model, version) ({WINDOW}) >= {t.min_window}", "10m", "ticket",
             where + " predictions drifted (PSI {{ $value }})"),
        rule("ShipyardOnlineAccuracyDrop",
             f'(shipyard_build_metric{{metric="accuracy"}} - on (model, version, metric) {ONLINE}{{metric="accuracy"}})'
             f" > {t.accuracy_drop} and on (model, version) ({FEEDBACK}) >= {t.min_feedback}", "15m", "page",
             where + " online accuracy is {{ $value }} below its build"),
        rule("ShipyardOnlineErrorIncrease",
             f'{ONLINE}{{metric=~"mse|mae"}} > on (model, version, metric) shipyard_build_metric{{metric=~"mse|mae"}}'
             f" * {1 + t.error_increase} and on (model, version) ({FEEDBACK}) >= {t.min_feedback}", "15m", "page",
             where + " online {{ $labels.metric }} is {{ $value }}, well above its build"),
        rule("ShipyardShadowDisagreement", f"({SHADOW}) > {t.shadow_disagreement}", "10m", "ticket",
             "shadow " + where + " disagrees on {{ $value | humanizePercentage }}"),
    ]}]}  # fmt: skip


def export(folder: Path, limits: Thresholds | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    board, rules = folder / "grafana-dashboard.json", folder / "prometheus-rules.yaml"
    board.write_text(json.dumps(dashboard(), indent=2))
    rules.write_text(yaml.safe_dump(alert_rules(limits), sort_keys=False, width=200))
    return [board, rules]
