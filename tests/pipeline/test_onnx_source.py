from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from shipyard import onnxrt
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


def test_the_lineage_hash_covers_weights_kept_beside_the_graph(
    tmp_path: Path, registry: LocalRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnxrt, "_SINGLE_FILE_LIMIT", 1 << 10)  # the > 2 GB layout, at a test's size
    model = onnx.load(str(make_mlp_onnx(tmp_path / "plain.onnx", sizes=(64, 64, 4))))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    manifest = import_onnx(tmp_path / "ext.onnx", "ext", registry)
    files = {f.path: f.sha256 for f in manifest.files}
    placed = next(step for step in manifest.lineage if step.step == "convert")  # it places the model
    both = [["model.onnx", files["model.onnx"]], ["model.onnx.data", files["model.onnx.data"]]]
    assert placed.output_sha256 == hashlib.sha256(json.dumps(both).encode()).hexdigest()  # not the graph's alone


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
    with pytest.raises(SpecError, match=r"input 'input' is not an input of the graph in mlp\.onnx \(its inputs: x\)"):
        build(load_spec(spec), registry)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (
            {"name": "logits", "dtype": "float32", "shape": ["batch", 100]},
            r"output 'logits': dimension 1 is declared 100, the graph in mlp\.onnx's is 4",
        ),
        (
            {"name": "logits", "dtype": "int64", "shape": ["batch", 4]},
            r"output 'logits' is declared int64, the graph in mlp\.onnx's is float32",
        ),
        (
            {"name": "logits", "dtype": "float32", "shape": ["batch"]},
            r"output 'logits' is declared \['batch'\], the graph in mlp\.onnx's is \['batch', 4\]",
        ),
    ],
)
def test_a_declared_output_that_is_not_the_graphs_is_refused(
    mlp_onnx: Path, registry: LocalRegistry, output: dict[str, object], message: str
) -> None:
    inputs = [{"name": "x", "dtype": "float32", "shape": ["batch", 16]}]
    spec = write_spec(
        mlp_onnx.parent,
        {"name": "m", "model": {"format": "onnx", "path": "mlp.onnx",
                                "signature": {"inputs": inputs, "outputs": [output]}}},
    )  # fmt: skip
    with pytest.raises(SpecError, match=message):
        build(load_spec(spec), registry)
    assert "m" not in registry.models()


def test_a_declared_signature_that_matches_keeps_its_dimension_names(mlp_onnx: Path, registry: LocalRegistry) -> None:
    tensors = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["n", 16]}],
               "outputs": [{"name": "logits", "dtype": "float32", "shape": ["n", 4]}]}  # fmt: skip
    spec = write_spec(mlp_onnx.parent, {"name": "m", "model": {"format": "onnx", "path": "mlp.onnx",
                                                               "signature": tensors}})  # fmt: skip
    manifest = build(load_spec(spec), registry)
    assert manifest.signature.outputs[0].shape == ["n", 4]


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


def _chain_with_side_files(folder: Path, layers: int, width: int, one_file: bool) -> Path:
    rng = np.random.default_rng(0)
    weights = [onnx.numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), f"w{i}")
               for i in range(layers)]  # fmt: skip
    names = ["x", *[f"h{i}" for i in range(layers - 1)], "y"]
    nodes = [onnx.helper.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]]) for i in range(layers)]
    graph = onnx.helper.make_graph(
        nodes, "chain", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", width])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", width])], initializer=weights,
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = folder / "chain.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=one_file,
                    location="chain.weights" if one_file else None, size_threshold=0)  # fmt: skip
    return path


PLACE = """
import resource, sys
from pathlib import Path
from shipyard import onnxrt
onnxrt._SINGLE_FILE_LIMIT = 1 << 20
source, dest = Path(sys.argv[1]), Path(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
onnxrt.place_model(source, onnxrt.check_onnx(source), dest)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.parametrize("one_file", [True, False])
def test_a_big_model_is_placed_by_streaming_its_weights_not_loading_them(tmp_path: Path, one_file: bool) -> None:
    source_dir, dest_dir = tmp_path / "exported", tmp_path / "artifact"
    source_dir.mkdir()
    dest_dir.mkdir()
    source = _chain_with_side_files(source_dir, 4, 2048, one_file)  # 64 MiB in one file, or one file per tensor
    grown = subprocess.run([sys.executable, "-c", PLACE, str(source), str(dest_dir / "model.onnx")], check=True,
                           capture_output=True, text=True).stdout  # fmt: skip
    assert int(grown) < 40  # MiB: a 64 MiB chunk is read at most, never the 64 MiB of weights at once
    assert sorted(p.name for p in dest_dir.iterdir()) == ["model.onnx", "model.onnx.data"]
    x = np.random.default_rng(1).standard_normal((2, 2048)).astype(np.float32)

    def run(path: Path) -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # type: ignore[no-any-return]

    np.testing.assert_array_equal(run(dest_dir / "model.onnx"), run(source))


def test_weights_outside_the_model_folder_or_cut_short_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnxrt, "_SINGLE_FILE_LIMIT", 1 << 10)
    source = _chain_with_side_files(tmp_path, 2, 64, one_file=True)
    graph = onnxrt.check_onnx(source)
    escaped = onnx.ModelProto.FromString(graph.SerializeToString())
    for entry in escaped.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../outside.bin"
    (tmp_path.parent / "outside.bin").write_bytes(b"\0" * 64 * 64 * 4)
    with pytest.raises(ModelLoadError, match="is not a file in the model's folder"):
        onnxrt.place_model(source, escaped, tmp_path / "placed.onnx")
    data = tmp_path / "chain.weights"
    data.write_bytes(data.read_bytes()[:-4])
    with pytest.raises(ModelLoadError, match=r"run past the end of chain\.weights"):
        onnxrt.place_model(source, graph, tmp_path / "placed.onnx")
