"""The user-facing spec: models, loader and JSON Schema."""

from __future__ import annotations

from shipyard.spec.loader import LoadedSpec, json_schema, load_spec, parse_spec
from shipyard.spec.models import ShipyardSpec, SignatureSpec, TensorSpec

__all__ = [
    "LoadedSpec",
    "ShipyardSpec",
    "SignatureSpec",
    "TensorSpec",
    "json_schema",
    "load_spec",
    "parse_spec",
]
