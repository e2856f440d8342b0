"""Pruning and distillation on a CNN trained here (scikit-learn digits), through the real build."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from shipyard.errors import SpecError
from shipyard.pipeline import build
from shipyard.registry import LocalRegistry
from shipyard.spec import load_spec, parse_spec
from tests._helpers import write_spec

torch = pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parents[2] / "src" / "shipyard" / "examples" / "digits"
SPLIT = {"kind": "sklearn", "name": "digits", "test_size": 0.25, "seed": 0}
TEACHER = {"channels": 16, "hidden": 64}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's model.py and a teacher trained for a few epochs on the training split."""
    from safetensors.torch import save_file

    from shipyard.pipeline.datasets import sklearn_split
    from shipyard.spec.models import SklearnDatasetSpec

    folder = tmp_path_factory.mktemp("digits")
    shutil.copy(EXAMPLE / "model.py", folder / "model.py")
    import importlib.util

    loader = importlib.util.spec_from_file_location("digits_model", folder / "model.py")
    assert loader is not None
    assert loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    x, _, y, _ = sklearn_split(SklearnDatasetSpec.model_validate({**SPLIT, "split": "train"}))
    inputs, labels = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8), torch.tensor(y)
    torch.manual_seed(0)
    model = module.DigitsCNN(**TEACHER)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        for i in range(0, len(inputs), 64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs[i : i + 64]), labels[i : i + 64]).backward()
            optimizer.step()
    save_file(model.state_dict(), str(folder / "weights.safetensors"))
    return folder


def _spec(project: Path, steps: list[dict[str, Any]], **optimize: Any) -> dict[str, Any]:
    return {
        "name": "digits",
        "model": {
            "format": "torch", "module": "model:DigitsCNN", "init_args": TEACHER, "weights": "weights.safetensors",
            "signature": {"inputs": [{"name": "pixels", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]},
        },
        "convert": {"exporter": "legacy"},  # the faster exporter keeps the test short
        "evaluation": {"dataset": {**SPLIT, "split": "test"}, "metric": "accuracy", "latency": {"iterations": 20}},
        "optimize": {"steps": steps, "train_data": {**SPLIT, "split": "train"}, "speed_batch": 64,
                     "max_drop": 0.1, "min_speedup": 0.0, **optimize},
    }  # fmt: skip


def _candidates(project: Path, registry: LocalRegistry, steps: list[dict[str, Any]]) -> tuple[Any, list[Any]]:
    manifest = build(load_spec(write_spec(project, _spec(project, steps))), registry)
    return manifest, manifest.lineage[-1].params["candidates"]


def _student(channels: int, hidden: int) -> dict[str, Any]:
    return {"module": "model:DigitsCNN", "init_args": {"channels": channels, "hidden": hidden}}


def test_channel_pruning_removes_channels_and_distillation_trains_a_student(
    project: Path, registry: LocalRegistry
) -> None:
    manifest, (pruned, distilled) = _candidates(project, registry, [
        {"step": "prune", "params": {"method": "channels", "amount": 0.5, "finetune_epochs": 3}},
        {"step": "distill", "params": {"student": _student(4, 16), "epochs": 15}},
    ])  # fmt: skip
    teacher_parameters = manifest.metrics["parameters_unoptimized"]
    # Half the channels of every hidden layer go: about a quarter of the weights remain.
    assert pruned["params"]["parameters_before"] == teacher_parameters
    assert pruned["params"]["parameters_after"] < 0.35 * teacher_parameters
    assert pruned["metric"] >= 0.9, pruned
    assert distilled["params"]["parameters_after"] < pruned["params"]["parameters_after"]
    assert distilled["metric"] >= 0.8, distilled
    assert distilled["params"]["loss"] > 0
    # Whatever won is the registered model; the lineage lists every step that made it.
    applied = [step["step"] for step in manifest.lineage[-1].params["applied"]]
    accepted = [c["step"] for c in (pruned, distilled) if c["accepted"]]
    assert applied == accepted
    if applied:
        assert manifest.metrics["parameters"] < teacher_parameters


def test_magnitude_pruning_zeroes_weights_but_keeps_shapes(project: Path, registry: LocalRegistry) -> None:
    _, (candidate,) = _candidates(project, registry, [{"step": "prune", "params": {"method": "magnitude",
                                                                                    "amount": 0.6}}])  # fmt: skip
    params = candidate["params"]
    assert params["parameters_after"] == params["parameters_before"]
    assert 0.59 <= params["sparsity"] <= 0.61
    assert candidate["failed_guard"] != "error", candidate["reason"]


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"step": "prune", "params": {"method": "blocks"}}, "method must be magnitude or channels"),
        ({"step": "prune", "params": {"amount": 1.5}}, "amount must be between 0 and 1"),
        ({"step": "prune", "params": {"ignore": ["nope"]}}, "ignore names no submodule"),
        ({"step": "distill", "params": {"student": "model:DigitsCNN"}}, "student must be"),
        ({"step": "distill", "params": {"student": {"module": "model:Missing"}}}, "has no attribute 'Missing'"),
        ({"step": "distill", "params": {"student": {"module": "model:DigitsCNN", "init_args": {"x": 1}}}},
         "cannot build the student"),
    ],
)  # fmt: skip
def test_bad_step_parameters_fail_the_candidate_not_the_build(
    project: Path, registry: LocalRegistry, step: dict[str, Any], message: str
) -> None:
    manifest, (candidate,) = _candidates(project, registry, [step])
    assert candidate["failed_guard"] == "error"
    assert message in candidate["reason"]
    assert manifest.lineage[-1].params["applied"] == []  # the unoptimized model is registered


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["optimize"]["steps"].reverse(), "list them before the ONNX steps"),
        (lambda s: s["optimize"].pop("train_data"), "need `train_data`"),
        (lambda s: s["optimize"].update(train_data=s["evaluation"]["dataset"]), "is the evaluation set"),
        (lambda s: s["model"].update(format="onnx", path="m.onnx", module=None, weights=None, init_args={}),
         "work on PyTorch models"),
    ],
)  # fmt: skip
def test_spec_rules_for_pytorch_steps(project: Path, change: Any, message: str) -> None:
    spec = _spec(project, [{"step": "distill", "params": {"student": _student(4, 16)}}, {"step": "graph"}])
    change(spec)
    with pytest.raises(SpecError, match=message):
        parse_spec(spec, source="test")
