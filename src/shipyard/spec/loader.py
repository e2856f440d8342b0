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


MAX_SPEC_NODES = 100_000  # a real spec has a few hundred; YAML aliases must not expand one past this


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _expanded_size(root: yaml.Node, source: Path) -> int:
    """Nodes in the document with every alias expanded, counted without expanding anything (memoised per node)."""
    sizes: dict[int, int] = {}
    path: set[int] = set()  # the nodes being counted: meeting one again is an alias that contains itself
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            path.discard(key)
            sizes[key] = min(MAX_SPEC_NODES + 1, 1 + sum(sizes[id(c)] for c in _children(node)))
        elif key not in sizes:
            if key in path:
                raise SpecError(f"{source}: a YAML alias refers to a node that contains it")
            path.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    return sizes[id(root)]


def _bounded_yaml(text: str, source: Path) -> Any:
    """safe_load, refusing documents whose aliases expand past MAX_SPEC_NODES before building them."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, source)
        if size > MAX_SPEC_NODES:
            raise SpecError(f"{source}: YAML aliases expand this spec past {MAX_SPEC_NODES:,} values; "
                            "write the repeated parts out, or use fewer aliases")  # fmt: skip
        return loader.construct_document(node)
    finally:
        loader.dispose()


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
        data = _bounded_yaml(text, spec_path)
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
