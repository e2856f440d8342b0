from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from shipyard.errors import EvaluationError, ModelLoadError, SpecError
from shipyard.pipeline import build, import_onnx
from shipyard.registry import LocalRegistry
from shipyard.spec import load_spec
from tests._helpers import make_mlp_onnx, write_spec


def test_import_reads_the_signature_from_the_graph(mlp_onnx: Path, registry: LocalRegistry) -> None:
    manifest = import_onnx(mlp_onnx, "mlp", registry)
    assert manifest.version == 1
    assert manifest.signature.model_dump()["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 16]}]
    assert manifest.signature.outputs[0].name == "logits"
    assert manifest.metrics["parameters"] == 16 * 8 + 8 * 4
    assert manifest.metrics["max_abs_error"] == 0.0
    assert manifest.file("model.onnx").sha256 == manifest.lineage[0].output_sha256  # copied byte for byte


def test_reimport_has_the_same_content_hash(mlp_onnx: Path, registry: LocalRegistry, tmp_path: Path) -> None:
    first = import_onnx(mlp_onnx, "mlp", registry)
    second = import_onnx(mlp_onnx, "mlp", registry)
    other = import_onnx(make_mlp_onnx(tmp_path / "other.onnx", seed=1), "mlp", registry)
    assert first.content_hash == second.content_hash != other.content_hash
    assert [first.version, second.version, other.version] == [1, 2, 3]


@pytest.mark.parametrize(
    "content",
    [b"", b"not a protobuf at all \x00\xff", b"\x08\x07\x12\x04test"],
    ids=["empty", "garbage", "graphless"],
)
def test_corrupt_onnx_is_refused_and_nothing_registered(
    tmp_path: Path, registry: LocalRegistry, content: bytes
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"bad\.onnx"):
        import_onnx(bad, "bad", registry)
    assert registry.all_versions() == []
    assert not any((registry.root / ".staging").iterdir())


def test_truncated_onnx_is_refused(mlp_onnx: Path, registry: LocalRegistry) -> None:
    mlp_onnx.write_bytes(mlp_onnx.read_bytes()[:-40])
    with pytest.raises(ModelLoadError):
        import_onnx(mlp_onnx, "mlp", registry)
    assert registry.all_versions() == []


def test_external_data_is_gathered_into_the_artifact(tmp_path: Path, registry: LocalRegistry) -> None:
    model = onnx.load(str(make_mlp_onnx(tmp_path / "plain.onnx")))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    manifest = import_onnx(tmp_path / "ext.onnx", "ext", registry)
    (tmp_path / "w.bin").unlink()  # the artifact must not depend on the source's weight file
    folder = registry.path("ext:1")
    assert {f.path for f in manifest.files} <= {"model.onnx", "model.onnx.data"}
    registry.manifest("ext:1", verify=True)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((2, 16), np.float32)})[0].shape == (2, 4)


def test_invalid_import_name_is_a_spec_error(mlp_onnx: Path, registry: LocalRegistry) -> None:
    with pytest.raises(SpecError, match=r"shipyard import: name"):
        import_onnx(mlp_onnx, "../escape", registry)


def test_declared_signature_must_match_the_graph(mlp_onnx: Path, registry: LocalRegistry) -> None:
    spec = write_spec(
        mlp_onnx.parent,
        {
            "name": "m",
            "model": {
                "format": "onnx",
                "path": "mlp.onnx",
                "signature": {"inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 16]}]},
            },
        },
    )
    with pytest.raises(ModelLoadError, match="signature names 'input'"):
        build(load_spec(spec), registry)


def test_evaluation_with_npz_and_metrics(mlp_onnx: Path, registry: LocalRegistry) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 16)).astype(np.float32)
    labels = rng.integers(0, 4, 256)
    np.savez(mlp_onnx.parent / "data.npz", features=x, labels=labels)
    scores = ort.InferenceSession(str(mlp_onnx), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    top2 = np.argsort(scores, axis=1)[:, -2:]
    expected = float(np.mean([label in row for label, row in zip(labels, top2, strict=True)]))
    assert 0.2 < expected < 0.8  # random labels: a metric that ignored the model could not land on it
    spec = write_spec(
        mlp_onnx.parent,
        {
            "name": "m",
            "model": {"format": "onnx", "path": "mlp.onnx"},
            "evaluation": {
                "dataset": {"kind": "npz", "path": "data.npz", "inputs": {"x": "features"}, "target": "labels"},
                "metric": {"name": "top_k", "k": 2},
                "latency": {"iterations": 10},
            },
        },
    )
    manifest = build(load_spec(spec), registry)
    assert manifest.metrics["top_k"] == pytest.approx(expected)


def test_dataset_that_does_not_fit_the_model(mlp_onnx: Path, registry: LocalRegistry) -> None:
    np.savez(mlp_onnx.parent / "data.npz", x=np.zeros((8, 5), dtype=np.float32), y=np.zeros(8))
    spec = write_spec(
        mlp_onnx.parent,
        {
            "name": "m",
            "model": {"format": "onnx", "path": "mlp.onnx"},
            "evaluation": {"dataset": {"kind": "npz", "path": "data.npz"}, "metric": "accuracy"},
        },
    )
    with pytest.raises(EvaluationError, match=r"samples of shape \[5\] cannot become \[16\]"):
        build(load_spec(spec), registry)
    assert registry.all_versions() == []


def test_evaluation_times_on_the_served_device_or_says_it_could_not(mlp_onnx: Path, registry: LocalRegistry) -> None:
    spec = {"name": "m", "model": {"format": "onnx", "path": "mlp.onnx"}, "serve": {"device": "cuda"}}
    manifest = build(load_spec(write_spec(mlp_onnx.parent, spec)), registry)
    evaluate = next(s.params for s in manifest.lineage if s.step == "evaluate")
    # CUDA where onnxruntime-gpu has it; this CPU-only machine times it on the CPU and the lineage says so.
    wanted = (
        "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPUExecutionProvider"
    )
    assert evaluate["provider"] == wanted
