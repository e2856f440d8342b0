"""Compare two manifests field by field (for `shipyard models diff`)."""

from __future__ import annotations

import json

from shipyard.artifact.manifest import Manifest


def _signature_lines(manifest: Manifest) -> dict[str, str]:
    lines = {}
    for kind, tensors in (("input", manifest.served_signature.inputs), ("output", manifest.served_signature.outputs)):
        for t in tensors:
            lines[f"{kind} {t.name}"] = f"{t.dtype}{json.dumps(t.shape, separators=(',', ':'))}"
    return lines


def _flat(value: object, prefix: str = "") -> dict[str, str]:
    """A nested spec as dotted keys (serve.max_batch_size) and JSON values."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: json.dumps(value, sort_keys=True)} if prefix else {}


def diff_manifests(a: Manifest, b: Manifest) -> list[tuple[str, str, str]]:
    """Rows (field, value in a, value in b) for every field that differs."""
    rows: list[tuple[str, str, str]] = []

    def add(field: str, left: object, right: object) -> None:
        if left != right:
            rows.append((field, "—" if left is None else str(left), "—" if right is None else str(right)))

    add("content_hash", a.content_hash, b.content_hash)
    add("size_bytes", a.size_bytes, b.size_bytes)
    sig_a, sig_b = _signature_lines(a), _signature_lines(b)
    for key in sorted(set(sig_a) | set(sig_b)):
        add(key, sig_a.get(key), sig_b.get(key))
    for key in sorted(set(a.metrics) | set(b.metrics)):
        left, right = a.metrics.get(key), b.metrics.get(key)
        add(
            f"metric {key}",
            None if left is None else f"{left:.6g}",
            None if right is None else f"{right:.6g}",
        )
    # The spec each was built from: serving settings change what a version does without changing its files.
    spec_a, spec_b = _flat(a.spec or {}), _flat(b.spec or {})
    for key in sorted(set(spec_a) | set(spec_b)):
        add(f"spec {key}", spec_a.get(key), spec_b.get(key))
    add("lineage", " → ".join(s.step for s in a.lineage), " → ".join(s.step for s in b.lineage))
    for key in sorted(set(a.environment) | set(b.environment)):
        add(f"env {key}", a.environment.get(key), b.environment.get(key))
    return rows
