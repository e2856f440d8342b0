"""Every PyTorch loader, the exporters, and the conversion check — each ending in the registry or in nothing."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shipyard.errors import ConversionError, ModelLoadError, SpecError, UnsafeModelError
from shipyard.pipeline import build
from shipyard.pipeline._imports import import_object
from shipyard.registry import LocalRegistry
from shipyard.spec import load_spec
from tests._helpers import write_spec
from tests.conftest import CliResult

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

MODEL_PY = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, features=6, classes=3):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))

        def forward(self, x):
            return self.body(x)


    class Diverging(Net):
        # Behaves differently while being exported: the ONNX graph will not match eager PyTorch.
        def forward(self, x):
            y = super().forward(x)
            if torch.onnx.is_in_onnx_export():
                y = y + 0.5
            return y
    """
)
SIGNATURE = {
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 6]}],
    "outputs": [{"name": "scores", "dtype": "float32", "shape": ["batch", 3]}],
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with model.py, trained-looking weights in three formats, and an evaluation set."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "model.py").write_text(MODEL_PY)
    torch.manual_seed(0)
    net = import_object("model:Net", folder)().eval()  # as a build imports it (another test's `model` may be cached)
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(folder / "weights.safetensors"))
    torch.save(net.state_dict(), str(folder / "weights.pt"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6)).astype(np.float32)
    with torch.no_grad():
        y = net(torch.from_numpy(x)).argmax(1).numpy()
    y[:20] = (y[:20] + 1) % 3  # some wrong labels so accuracy is not trivially 1
    np.savez(folder / "eval.npz", x=x, y=y)
    return folder


def _spec(project: Path, model: dict[str, Any], **extra: Any) -> Path:
    spec = {
        "name": "net",
        "model": {"format": "torch", "signature": SIGNATURE, **model},
        "evaluation": {
            "dataset": {"kind": "npz", "path": "eval.npz"},
            "metric": "accuracy",
            "latency": {"iterations": 20},
        },
        **extra,
    }
    return write_spec(project, spec)


def _build(spec_path: Path, registry: LocalRegistry) -> Any:
    return build(load_spec(spec_path), registry)


def _exporter(manifest: Any) -> str:
    return str(next(s for s in manifest.lineage if s.step == "convert").params["exporter"])


def test_module_and_safetensors_with_dynamo(project: Path, registry: LocalRegistry) -> None:
    manifest = _build(_spec(project, {"module": "model:Net", "weights": "weights.safetensors"}), registry)
    assert manifest.version == 1
    assert _exporter(manifest) == "dynamo"
    assert manifest.metrics["accuracy"] == manifest.metrics["accuracy_original"] == pytest.approx(0.9)
    assert manifest.metrics["max_abs_error"] < 1e-4
    assert manifest.metrics["parameters"] == 6 * 16 + 16 + 16 * 3 + 3
    assert manifest.signature.inputs[0].shape == ["batch", 6]
    assert [t.name for t in manifest.signature.outputs] == ["scores"]
    assert manifest.metrics["latency_p50_ms"] > 0
    assert manifest.metrics["throughput_sps"] > 0
    load = manifest.lineage[0]
    assert load.step == "load"
    assert load.output_sha256 is not None
    convert = manifest.lineage[1]
    assert convert.input_sha256 == load.output_sha256
    assert convert.output_sha256 == manifest.file("model.onnx").sha256
    registry.manifest("net:1", verify=True)


def test_same_inputs_give_the_same_content_hash(project: Path, registry: LocalRegistry) -> None:
    spec = _spec(project, {"module": "model:Net", "weights": "weights.safetensors"}, convert={"exporter": "dynamo"})
    first, second = _build(spec, registry), _build(spec, registry)
    assert (first.version, second.version) == (1, 2)
    assert first.content_hash == second.content_hash


def test_module_and_pt_state_dict_with_legacy_exporter(project: Path, registry: LocalRegistry) -> None:
    spec = _spec(project, {"module": "model:Net", "weights": "weights.pt"}, convert={"exporter": "legacy", "opset": 17})
    manifest = _build(spec, registry)
    assert _exporter(manifest) == "legacy"
    assert manifest.metrics["accuracy"] == pytest.approx(0.9)


def test_torchscript_file(project: Path, registry: LocalRegistry) -> None:
    net = _load_net(project)
    torch.jit.save(torch.jit.script(net), str(project / "scripted.pt"))
    manifest = _build(_spec(project, {"path": "scripted.pt"}), registry)
    assert _exporter(manifest) == "legacy"  # dynamo cannot trace TorchScript: auto goes straight to legacy
    assert manifest.lineage[1].params["source_kind"] == "torchscript"
    assert manifest.metrics["accuracy"] == pytest.approx(0.9)


def test_torch_export_program(project: Path, registry: LocalRegistry) -> None:
    net = _load_net(project)
    batch = torch.export.Dim("batch")
    program = torch.export.export(net, (torch.zeros(2, 6),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(project / "net.pt2"))
    manifest = _build(_spec(project, {"path": "net.pt2"}), registry)
    assert manifest.lineage[1].params["source_kind"] == "torch.export"
    assert manifest.metrics["accuracy"] == pytest.approx(0.9)


def test_pickled_module_is_refused_unless_trusted(project: Path, registry: LocalRegistry) -> None:
    torch.save(_load_net(project), str(project / "whole.pt"))
    with pytest.raises(UnsafeModelError, match=r"pickled Python objects.*trust_pickle: true"):
        _build(_spec(project, {"path": "whole.pt"}), registry)
    assert registry.all_versions() == []
    manifest = _build(_spec(project, {"path": "whole.pt", "trust_pickle": True}), registry)
    assert manifest.lineage[1].params["source_kind"] == "pickle"


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_trusted_pickle_is_still_scanned_and_a_dangerous_one_refused(project: Path, registry: LocalRegistry) -> None:
    marker = project / "pwned"
    torch.save({"model": _Payload(marker)}, str(project / "trojan.pt"))
    with pytest.raises(UnsafeModelError, match=r"would import posix\.system"):
        _build(_spec(project, {"path": "trojan.pt", "trust_pickle": True}), registry)
    assert not marker.exists()  # refused before anything was unpickled
    assert registry.all_versions() == []


def test_pickle_inside_weights_is_refused(project: Path, registry: LocalRegistry) -> None:
    torch.save({"body.0.weight": _load_net(project)}, str(project / "sneaky.pt"))
    with pytest.raises(UnsafeModelError, match="unpickling runs arbitrary code"):
        _build(_spec(project, {"module": "model:Net", "weights": "sneaky.pt"}), registry)
    assert registry.all_versions() == []


def test_state_dict_given_as_model_path_explains_itself(project: Path, registry: LocalRegistry) -> None:
    with pytest.raises(ModelLoadError, match="is a state dict, not a model"):
        _build(_spec(project, {"path": "weights.pt"}), registry)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"module": "model:Net", "weights": "missing.safetensors"}, "weights file not found"),
        ({"module": "nomodule:Net", "weights": "weights.pt"}, "cannot import 'nomodule'"),
        ({"module": "model:Missing", "weights": "weights.pt"}, "has no attribute 'Missing'"),
        ({"module": "model:Net", "weights": "weights.pt", "init_args": {"features": 5}}, "does not fit model:Net"),
        ({"path": "missing.pt"}, "model file not found"),
        ({"path": "eval.npz"}, "not a TorchScript, torch.export or PyTorch file"),
    ],
)
def test_load_errors_are_clear_and_leave_nothing(
    project: Path, registry: LocalRegistry, model: dict[str, Any], message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        _build(_spec(project, model), registry)
    assert registry.all_versions() == []
    assert not any((registry.root / ".staging").iterdir())


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_export_that_diverges_fails_the_build(project: Path, registry: LocalRegistry, exporter: str) -> None:
    spec = _spec(
        project, {"module": "model:Diverging", "weights": "weights.safetensors"}, convert={"exporter": exporter}
    )
    with pytest.raises(ConversionError, match=r"output 'scores' .* beyond tolerance .* max abs error 0\.5"):
        _build(spec, registry)
    assert registry.all_versions() == []
    assert not any((registry.root / ".staging").iterdir())


def _without_evaluation(project: Path, signature: dict[str, Any]) -> Path:
    model = {"format": "torch", "module": "model:Net", "weights": "weights.safetensors", "signature": signature}
    return write_spec(project, {"name": "net", "model": model})


def test_without_evaluation_random_inputs_verify_the_export(project: Path, registry: LocalRegistry) -> None:
    spec = _without_evaluation(project, SIGNATURE)
    manifest = _build(spec, registry)
    assert manifest.lineage[1].params["verify_samples"] == 16
    assert "accuracy" not in manifest.metrics


def _load_net(project: Path) -> Any:
    net = import_object("model:Net", project)().eval()
    net.load_state_dict(torch.load(str(project / "weights.pt"), weights_only=True))
    return net


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        (
            [{"name": "scores", "dtype": "float32", "shape": ["batch", 100]}],
            "output 'scores': dimension 1 is declared 100",
        ),
        (
            [*SIGNATURE["outputs"], {"name": "extra", "dtype": "float32", "shape": ["batch"]}],
            "output 'extra' is not an output of the converted graph",
        ),
        ([{"name": "scores", "dtype": "float16", "shape": ["batch", 3]}], "is declared float16, the converted graph"),
        ([{"name": "scores", "dtype": "float32", "shape": ["batch", 3, 1]}], "is declared ['batch', 3, 1]"),
    ],
)
def test_a_declared_signature_that_disagrees_with_the_graph_is_refused(
    project: Path, registry: LocalRegistry, outputs: list[dict[str, Any]], message: str
) -> None:
    """The server would advertise what the spec declares: a wrong output must fail the build, not mislead clients."""
    spec = _spec(project, {"module": "model:Net", "weights": "weights.safetensors",
                           "signature": {"inputs": SIGNATURE["inputs"], "outputs": outputs}})  # fmt: skip
    with pytest.raises(SpecError, match=re.escape(message)):
        _build(spec, registry)
    assert registry.all_versions() == []


@pytest.mark.parametrize(
    ("inputs", "shown"),
    [
        ([{"name": "x", "dtype": "float32", "shape": ["batch", 5]}], "x float32 [2, 5]"),  # wrong width
        ([{"name": "x", "dtype": "float16", "shape": ["batch", 6]}], "x float16 [2, 6]"),  # float16 for float32
    ],
)
def test_a_signature_the_module_cannot_run_is_one_line_in_the_spec_s_terms(
    project: Path, cli: Callable[..., CliResult], inputs: list[dict[str, Any]], shown: str
) -> None:
    """It used to print torch's export log (with terminal colour codes) or ONNX Runtime's type-binding error."""
    signature = {"inputs": inputs, "outputs": SIGNATURE["outputs"]}
    # No evaluation set: the export is what meets the signature first (a dataset would be refused before it).
    spec = _without_evaluation(project, signature)
    result = cli("build", str(spec), "--registry", str(project / "registry"))
    assert result.code == 2, result.err
    text = " ".join(result.err.split())
    assert f"model.signature: the model cannot run on inputs shaped like the signature ({shown})" in text
    assert "Make model.signature.inputs match what its forward() takes" in text
    assert "\x1b[" not in result.err
    assert "Traceback" not in result.err
