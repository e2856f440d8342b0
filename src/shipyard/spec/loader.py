"""Read a `shipyard.yaml` into a validated ShipyardSpec, with errors that name file and field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from shipyard.errors import NotFoundError, SpecError
from shipyard.spec.models import ShipyardSpec


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec and the folder its relative paths are resolved against."""

    spec: ShipyardSpec
    path: Path

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def _field_path(loc: tuple[int | str, ...]) -> str:
    # pydantic puts the discriminator tag in the location (dataset.sklearn.name); keep the user's path.
    parts = [str(p) for p in loc if p not in ("sklearn", "npz", "function")]
    return ".".join(parts) or "(top level)"


def format_validation_error(source: str, exc: ValidationError) -> str:
    """One line per problem: `file: field.path: what was expected (got value)`."""
    lines = []
    for err in exc.errors(include_url=False):
        got = "" if err["type"] == "missing" else f" (got {json.dumps(err.get('input'), default=str)[:80]})"
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {_field_path(err['loc'])}: {message}{got}")
    return "\n".join(lines)


def parse_spec(data: Any, source: str) -> ShipyardSpec:
    """Validate already-parsed YAML/JSON data; `source` names it in errors."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of spec fields at the top level, got {type(data).__name__}")
    try:
        return ShipyardSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(source, exc)) from None


def load_spec(path: str | Path) -> LoadedSpec:
    """Read and validate a spec file; raises NotFoundError or SpecError."""
    spec_path = Path(path).expanduser().resolve()
    if spec_path.is_dir():
        spec_path = spec_path / "shipyard.yaml"
    try:
        text = spec_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFoundError(f"spec file not found: {spec_path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{spec_path}: cannot read spec: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{spec_path}{where}: invalid YAML: {problem}") from None
    return LoadedSpec(spec=parse_spec(data, str(spec_path)), path=spec_path)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of shipyard.yaml, for editors."""
    schema = ShipyardSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "shipyard.yaml"
    return schema
