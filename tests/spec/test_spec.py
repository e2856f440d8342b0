from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import yaml

from shipyard.errors import NotFoundError, SpecError
from shipyard.spec import json_schema, load_spec, parse_spec
from shipyard.spec.models import SklearnDatasetSpec

MINIMAL = {"name": "m", "model": {"format": "onnx", "path": "m.onnx"}}


def _spec_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shipyard.yaml"
    path.write_text(text)
    return path


def test_bundled_specs_validate() -> None:
    starter = yaml.safe_load(resources.files("shipyard").joinpath("spec/starter.yaml").read_text())
    assert parse_spec(starter, "starter").name == "my-model"
    digits = yaml.safe_load(resources.files("shipyard").joinpath("examples/digits/shipyard.yaml").read_text())
    spec = parse_spec(digits, "digits")
    assert spec.evaluation is not None
    assert isinstance(spec.evaluation.dataset, SklearnDatasetSpec)
    assert spec.evaluation.metric.better == "maximize"
    examples = resources.files("shipyard").joinpath("examples")
    specs = [f for d in examples.iterdir() if d.is_dir() for f in d.iterdir() if f.name.endswith(".yaml")]
    assert len(specs) >= 8  # one per example, two for text
    for path in specs:
        assert parse_spec(yaml.safe_load(path.read_text()), path.name).evaluation is not None


def test_unknown_field_is_an_error_naming_file_and_path(tmp_path: Path) -> None:
    path = _spec_file(tmp_path, "name: m\nmodel: {format: onnx, path: m.onnx, trust_pickel: true}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert str(path) in message
    assert "model.trust_pickel" in message
    assert "Extra inputs are not permitted" in message


def test_wrong_type_names_expected_and_got(tmp_path: Path) -> None:
    path = _spec_file(tmp_path, "name: m\nmodel: {format: onnx, path: m.onnx}\nconvert: {opset: eighteen}\n")
    with pytest.raises(SpecError, match=r"convert\.opset: Input should be a valid integer.*got \"eighteen\""):
        load_spec(path)


def test_bad_enum_value_lists_choices() -> None:
    choices = "'torch', 'onnx', 'sklearn', 'huggingface' or 'gguf'"
    with pytest.raises(SpecError, match=rf"model\.format: Input should be {choices}"):
        parse_spec({"name": "m", "model": {"format": "tensorflow", "path": "x"}}, "s")


def test_yaml_syntax_error_has_line_number(tmp_path: Path) -> None:
    path = _spec_file(tmp_path, "name: m\nmodel: {format: onnx\n")
    with pytest.raises(SpecError, match=r"shipyard\.yaml:\d+:\d+: invalid YAML"):
        load_spec(path)


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_folder_means_its_shipyard_yaml(tmp_path: Path) -> None:
    _spec_file(tmp_path, yaml.safe_dump(MINIMAL))
    assert load_spec(tmp_path).spec.name == "m"


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(SpecError, match="expected a mapping"):
        parse_spec(["a"], "s")


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"format": "torch", "path": "m.pt"}, "needs `signature.inputs`"),
        ({"format": "torch", "module": "m:Net"}, "needs `weights`"),
        ({"format": "onnx"}, "`path` is required"),
        ({"format": "onnx", "path": "a", "weights": "w"}, "`weights` goes with `module`"),
        ({"format": "sklearn", "module": "m:Net", "weights": "w"}, "only for format: torch"),
    ],
)
def test_incomplete_sources_are_rejected(model: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec({"name": "m", "model": model}, "s")


def test_names_cannot_escape_the_registry() -> None:
    for bad in ("../etc", "a/b", ".hidden", ""):
        with pytest.raises(SpecError, match="name"):
            parse_spec({**MINIMAL, "name": bad}, "s")


def test_metric_shorthand_and_direction_check() -> None:
    ok = parse_spec({**MINIMAL, "evaluation": {"dataset": {"kind": "npz", "path": "d.npz"}, "metric": "mse"}}, "s")
    assert ok.evaluation is not None
    assert ok.evaluation.metric.better == "minimize"
    with pytest.raises(SpecError, match="accuracy is better"):
        parse_spec(
            {
                **MINIMAL,
                "evaluation": {
                    "dataset": {"kind": "npz", "path": "d.npz"},
                    "metric": {"name": "accuracy", "direction": "minimize"},
                },
            },
            "s",
        )


def test_dataset_kind_is_checked_with_its_own_fields() -> None:
    with pytest.raises(SpecError, match=r"evaluation\.dataset\.name: Input should be 'digits'"):
        parse_spec({**MINIMAL, "evaluation": {"dataset": {"kind": "sklearn", "name": "mnist"}, "metric": "f1"}}, "s")


def test_serving_and_deploy_sections_are_validated() -> None:
    with pytest.raises(SpecError, match=r"serve: .*exceed max_batch_size"):
        parse_spec({**MINIMAL, "serve": {"max_batch_size": 8, "preferred_batch_sizes": [4, 16]}}, "s")
    with pytest.raises(SpecError, match=r"deploy\.resources\.memory"):
        parse_spec({**MINIMAL, "deploy": {"resources": {"memory": "lots"}}}, "s")
    with pytest.raises(SpecError, match="min_replicas 3 > max_replicas 2"):
        parse_spec({**MINIMAL, "deploy": {"min_replicas": 3, "max_replicas": 2}}, "s")


def test_duplicate_tensor_names_are_rejected() -> None:
    signature = {
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1]}],
        "outputs": [{"name": "x", "dtype": "float32", "shape": [1]}],
    }
    with pytest.raises(SpecError, match="repeated: x"):
        parse_spec({"name": "m", "model": {"format": "onnx", "path": "a", "signature": signature}}, "s")


def test_spec_is_immutable() -> None:
    spec = parse_spec(MINIMAL, "s")
    with pytest.raises(ValueError, match="frozen"):
        spec.name = "other"  # type: ignore[misc]


def test_json_schema_forbids_extras_and_documents_fields() -> None:
    schema = json_schema()
    json.dumps(schema)  # serialisable as-is
    assert schema["additionalProperties"] is False
    assert schema["properties"]["name"]["description"].startswith("Model name in the registry")
    source = schema["$defs"]["ModelSourceSpec"]
    assert source["additionalProperties"] is False
    assert "trust_pickle" in source["properties"]


def test_yaml_aliases_cannot_blow_a_spec_up(tmp_path: Path) -> None:
    """578 bytes of nested aliases once expanded to a 34.6 MB manifest; now the spec is refused unexpanded."""
    levels = ["    a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    bomb = "name: m\nmodel:\n  format: torch\n  module: model:Net\n  init_args:\n" + "\n".join(levels) + "\n"
    (tmp_path / "shipyard.yaml").write_text(bomb)
    assert len(bomb) < 600
    with pytest.raises(SpecError, match="YAML aliases expand this spec past 100,000 values"):
        load_spec(tmp_path)
    (tmp_path / "shipyard.yaml").write_text("name: m\nmodel: &m {format: onnx, path: [*m]}\n")
    with pytest.raises(SpecError, match="refers to a node that contains it"):
        load_spec(tmp_path)
    # Aliases that repeat a small part are fine.
    (tmp_path / "shipyard.yaml").write_text(
        "name: m\nmodel: {format: onnx, path: m.onnx}\n"
        "evaluation: {dataset: &d {kind: sklearn, name: digits, split: test}, metric: accuracy}\n"
        "optimize: {train_data: {<<: *d, split: train}, steps: [{step: fp16}]}\n"
    )
    assert load_spec(tmp_path).spec.optimize is not None
