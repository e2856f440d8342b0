"""The optimization steps and guards on models built in the test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from shipyard import onnxrt
from shipyard.errors import SpecError
from shipyard.onnxrt import uses_external_data
from shipyard.pipeline import build
from shipyard.pipeline.optimize.search import Candidate, applied_chain
from shipyard.pipeline.optimize.transforms import TRANSFORMS
from shipyard.registry import LocalRegistry
from shipyard.spec import load_spec, parse_spec
from tests._helpers import make_mlp_onnx, write_spec


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # type: ignore[no-any-return]


def _project(folder: Path, model: Path, optimize: dict[str, Any], samples: int = 400) -> Path:
    """Evaluation labels are the FP32 model's own predictions: its accuracy is 1.0 by construction.

    Feature 0 is always 0, so the outlier weight that make_mlp_onnx can plant on it never shows in the
    activations: only per-tensor weight quantization of that one layer is harmed.
    """
    x = np.random.default_rng(1).standard_normal((samples, 256)).astype(np.float32)
    x[:, 0] = 0.0
    np.savez(folder / "eval.npz", x=x, y=_run(model, x).argmax(1))
    return write_spec(folder, {
        "name": "opt", "model": {"format": "onnx", "path": model.name},
        "evaluation": {"dataset": {"kind": "npz", "path": "eval.npz"}, "metric": "accuracy",
                       "latency": {"iterations": 50}},
        "optimize": optimize,
    })  # fmt: skip


@pytest.mark.parametrize("step", sorted(TRANSFORMS))
def test_each_step_gives_a_valid_and_numerically_sane_model(tmp_path: Path, step: str) -> None:
    source = make_mlp_onnx(tmp_path / "fp32.onnx", sizes=(256, 256, 256, 10))
    x = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
    dest = tmp_path / f"{step}.onnx"
    try:
        params = TRANSFORMS[step](source, dest, {}, {"x": x})
    except Exception as exc:  # the converter's own failure is a rejected candidate, not a crash
        pytest.fail(f"{step} failed: {exc}")
    onnx.checker.check_model(str(dest))
    reference, got = _run(source, x), _run(dest, x)
    assert got.shape == reference.shape
    lossy = step == "weight_only"  # 4-bit weights: sane, but visibly coarser than INT8
    assert np.mean(got.argmax(1) == reference.argmax(1)) >= (0.8 if lossy else 0.9)
    cosine = np.sum(got * reference, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.mean() > (0.97 if lossy else 0.99)
    assert isinstance(params, dict)
    if step.startswith("quantize"):
        assert dest.stat().st_size < source.stat().st_size / 2.5  # INT8 weights


def _with_side_file(source: Path, dest: Path) -> Path:
    """The same graph with its weights in `dest.name + '.data'`, as models over protobuf's 2 GB are kept."""
    onnx.save_model(onnx.load(str(source)), str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{dest.name}.data", size_threshold=1024)  # fmt: skip
    return dest


@pytest.mark.parametrize("step", sorted(TRANSFORMS))
def test_each_step_keeps_weights_in_a_side_file_when_its_source_does(tmp_path: Path, step: str) -> None:
    source = _with_side_file(make_mlp_onnx(tmp_path / "inline.onnx", sizes=(256, 256, 256, 10)), tmp_path / "big.onnx")
    x = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
    dest = tmp_path / "out" / f"{step}.onnx"
    dest.parent.mkdir()
    TRANSFORMS[step](source, dest, {}, {"x": x})
    assert uses_external_data(dest)
    assert dest.with_name(f"{dest.name}.data").stat().st_size > dest.stat().st_size
    assert np.mean(_run(dest, x).argmax(1) == _run(source, x).argmax(1)) >= 0.8


def test_a_model_with_external_weights_goes_through_the_search(
    tmp_path: Path, registry: LocalRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path every model over 2 GB takes, with the single-file limit lowered to 100 kB for speed: the
    search used to refuse it outright."""
    monkeypatch.setattr(onnxrt, "_SINGLE_FILE_LIMIT", 100_000)
    inline = make_mlp_onnx(tmp_path / "inline.onnx", sizes=(256, 256, 256, 10))  # 330 kB of weights
    model = _with_side_file(inline, tmp_path / "mlp.onnx")
    steps = [{"step": s} for s in ("graph", "quantize_dynamic", "weight_only")]
    manifest = build(load_spec(_project(tmp_path, model, {"steps": steps, "min_speedup": 0.0, "max_drop": 0.2})),
                     registry)  # fmt: skip
    candidates = next(s.params for s in manifest.lineage if s.step == "optimize")["candidates"]
    assert [c["reason"] for c in candidates if c["reason"].startswith("failed")] == []
    folder = registry.path(registry.resolve("opt"))
    registered = folder / "model.onnx"
    big = registered.stat().st_size + sum(f.stat().st_size for f in folder.glob("model.onnx.data")) > 100_000
    assert uses_external_data(registered) == big  # weights beside the graph exactly when they pass the limit
    x = np.random.default_rng(1).standard_normal((32, 256)).astype(np.float32)
    assert _run(registered, x).shape == (32, 10)


def test_unknown_step_parameters_are_rejected(tmp_path: Path) -> None:
    source = make_mlp_onnx(tmp_path / "fp32.onnx", sizes=(256, 10))
    with pytest.raises(Exception, match=r"unknown parameters \['colour'\]"):
        TRANSFORMS["graph"](source, tmp_path / "out.onnx", {"colour": "red"}, {})


def test_accuracy_guard_rejects_a_model_built_to_break_under_int8(tmp_path: Path, registry: LocalRegistry) -> None:
    model = make_mlp_onnx(tmp_path / "fragile.onnx", sizes=(256, 256, 10), outlier=5000.0)
    spec = _project(tmp_path, model, {"steps": [{"step": "quantize_dynamic"}], "max_drop": 0.01, "fallback_trials": 0})
    manifest = build(load_spec(spec), registry)
    (candidate,) = manifest.lineage[-1].params["candidates"]
    assert not candidate["accepted"]
    assert "loss up to" in candidate["reason"]
    assert "exceeds the budget 0.01" in candidate["reason"]
    assert candidate["metric"] < 0.9
    assert manifest.metrics["accuracy"] == 1.0  # the unoptimized model was registered
    assert "accuracy_unoptimized" not in manifest.metrics


def test_fallback_keeps_the_harmful_node_in_float_and_recovers(tmp_path: Path, registry: LocalRegistry) -> None:
    model = make_mlp_onnx(tmp_path / "fragile.onnx", sizes=(256, 256, 1024, 1024, 10), outlier=5000.0)
    optimize = {"steps": [{"step": "quantize_dynamic"}], "max_drop": 0.05, "min_speedup": 0.0}
    manifest = build(load_spec(_project(tmp_path, model, optimize)), registry)
    first, second = manifest.lineage[-1].params["candidates"][:2]
    assert not first["accepted"]
    assert first["failed_guard"] == "metric"
    assert second["fallback"] == ["MatMul_0"]  # the layer with the outlier weight, ranked worst
    assert second["metric"] > 0.95
    assert second["accepted"], second["reason"]
    assert manifest.lineage[-1].params["applied"][0]["params"]["nodes_to_exclude"] == ["MatMul_0"]


def test_speed_guard_rejects_a_slower_candidate(tmp_path: Path, registry: LocalRegistry) -> None:
    # Many tiny layers: dynamic quantization's per-layer quantize/dequantize work costs more than it saves
    # (measured here: ~30 % slower, 39 vs 30 µs).
    model = make_mlp_onnx(tmp_path / "tiny.onnx", sizes=(256, 8, 8, 8, 8, 8, 8, 10))
    spec = _project(tmp_path, model, {"steps": [{"step": "quantize_dynamic"}], "max_drop": 1.0})
    manifest = build(load_spec(spec), registry)
    (candidate,) = manifest.lineage[-1].params["candidates"]
    assert not candidate["accepted"]
    assert candidate["reason"].startswith("not faster than its parent")
    assert candidate["p50_ms"] > candidate["parent_p50_ms"] * 0.95


def test_accepted_steps_replace_the_model_and_keep_the_old_figures(tmp_path: Path, registry: LocalRegistry) -> None:
    model = make_mlp_onnx(tmp_path / "big.onnx", sizes=(256, 1024, 1024, 10))
    spec = _project(tmp_path, model, {"steps": [{"step": "quantize_static", "params": {"calibration_samples": 64}}],
                                      "max_drop": 0.05, "min_speedup": 0.0})  # fmt: skip
    manifest = build(load_spec(spec), registry)
    (candidate,) = manifest.lineage[-1].params["candidates"]
    assert candidate["accepted"], candidate["reason"]
    assert manifest.lineage[-1].params["applied"] == [{"step": "quantize_static", "params": candidate["params"]}]
    assert manifest.metrics["size_bytes"] < manifest.metrics["size_bytes_unoptimized"] / 2.5
    assert manifest.metrics["accuracy_unoptimized"] == 1.0
    assert manifest.metrics["accuracy"] >= 0.95
    folder = registry.path("opt:1")
    registry.manifest("opt:1", verify=True)
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(folder / "model.onnx")).graph.node)


def test_failed_and_unreached_trials_still_register_the_best(tmp_path: Path, registry: LocalRegistry) -> None:
    model = make_mlp_onnx(tmp_path / "m.onnx", sizes=(256, 64, 10))
    steps = [{"step": "graph", "params": {"level": "turbo"}}, {"step": "graph"}, {"step": "quantize_dynamic"}]
    spec = _project(tmp_path, model, {"steps": steps, "max_trials": 2, "min_speedup": 0.0, "max_drop": 1.0})
    manifest = build(load_spec(spec), registry)
    candidates = manifest.lineage[-1].params["candidates"]
    assert candidates[0]["reason"].startswith("failed: optimize step graph: level must be one of")
    assert candidates[2]["reason"] == "not tried: trial or time budget spent"
    assert manifest.version == 1


def test_optimize_needs_an_evaluation_section() -> None:
    with pytest.raises(SpecError, match="`optimize` needs an `evaluation` section"):
        parse_spec({"name": "m", "model": {"format": "onnx", "path": "m.onnx"},
                    "optimize": {"steps": [{"step": "graph"}]}}, "s")  # fmt: skip


def test_report_command_regenerates_markdown_and_html(tmp_path: Path, cli: Any) -> None:
    model = make_mlp_onnx(tmp_path / "m.onnx", sizes=(256, 64, 10))
    spec = _project(tmp_path, model, {"steps": [{"step": "graph"}, {"step": "quantize_dynamic"}], "max_drop": 1.0})
    reg = str(tmp_path / "registry")
    built = cli("build", str(spec), "-r", reg)
    assert built.code == 0, built.err
    assert "optimization report:" in built.err
    assert (tmp_path / "reports" / "opt-1.html").is_file()
    printed = cli("report", "opt:1", "-r", reg)
    assert printed.code == 0
    assert "# Optimization report: opt:1" in printed.out
    assert "| 1 | quantize_dynamic" in printed.out
    written = cli("report", "opt:1", "-r", reg, "--out", str(tmp_path / "again"))
    assert written.code == 0
    page = (tmp_path / "again" / "opt-1.html").read_text()
    assert "data:image/png;base64," in page
    assert "quantize_dynamic" in page
    imported = cli("import", str(model), "--name", "plain", "-r", reg)
    assert imported.code == 0
    refused = cli("report", "plain:1", "-r", reg)
    assert refused.code == 2
    assert "built without an `optimize:` section" in refused.err


def test_later_steps_also_build_on_a_step_that_was_not_faster_alone(tmp_path: Path, registry: LocalRegistry) -> None:
    model = make_mlp_onnx(tmp_path / "big.onnx", sizes=(256, 1024, 1024, 10))
    steps = [{"step": "graph"}, {"step": "quantize_dynamic", "params": {"per_channel": True}}]
    spec = _project(tmp_path, model, {"steps": steps, "max_drop": 0.05, "min_speedup": 0.3})
    manifest = build(load_spec(spec), registry)
    graph, alone, combined = manifest.lineage[-1].params["candidates"]
    assert graph["failed_guard"] == "speed"  # graph optimization alone is not 30 % faster
    assert alone["built_on"] is None
    assert combined["built_on"] == 0  # the same quantization, tried on top of the graph-optimized model
    assert combined["step"] == "quantize_dynamic"


def test_the_applied_chain_follows_what_each_winner_was_built_on() -> None:
    graph = Candidate(0, "graph", {}, False, "not faster alone", failed_guard="speed")
    alone = Candidate(1, "quantize_dynamic", {}, True, "1.9x faster")
    combined = Candidate(2, "quantize_dynamic", {}, True, "2.3x faster", built_on=0)
    assert [c.trial for c in applied_chain([graph, alone, combined], combined)] == [0, 2]
    assert [c.trial for c in applied_chain([graph, alone], alone)] == [1]
    assert applied_chain([graph], None) == []


def test_a_quantizer_is_not_run_on_an_already_quantized_model(tmp_path: Path, registry: LocalRegistry) -> None:
    """Static INT8 on top of the held dynamic-INT8 model gave ONNX Runtime an invalid graph ("two nodes with
    the same node name"); now it is not tried, and the candidate says why."""
    model = make_mlp_onnx(tmp_path / "tiny.onnx", sizes=(256, 8, 8, 8, 8, 8, 8, 10))  # INT8 not faster here
    steps = [{"step": "quantize_dynamic"}, {"step": "quantize_static", "params": {"calibration_samples": 32}}]
    manifest = build(load_spec(_project(tmp_path, model, {"steps": steps, "max_drop": 1.0})), registry)
    candidates = manifest.lineage[-1].params["candidates"]
    assert candidates[0]["failed_guard"] == "speed"  # held: later steps would build on it
    on_held = [c for c in candidates if c["step"] == "quantize_static" and c["built_on"] == 0]
    assert len(on_held) == 1
    assert on_held[0]["reason"].startswith("not tried on trial 0's model: it is already quantized (quantize_dynamic)")
    assert not any("same node name" in c["reason"] for c in candidates)


def test_a_missing_calibration_range_is_explained_in_the_spec_s_terms() -> None:
    from shipyard.pipeline.optimize.search import explain

    reason = explain("quantize_static", KeyError("/stem/stem.2/Relu_output_0_scale"))  # the quantizer's own error
    assert reason.startswith("static INT8 found no calibration range for tensor '/stem/stem.2/Relu_output_0'")
    assert "list quantize_static before graph in optimize.steps" in reason
    assert explain("quantize_dynamic", ValueError("boom")) == "ValueError: boom"


def test_the_tensorrt_step_is_tried_only_where_tensorrt_is_and_the_build_goes_on(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    model = make_mlp_onnx(tmp_path / "m.onnx", sizes=(256, 64, 10))
    steps = [{"step": "graph"}, {"step": "tensorrt", "params": {"fp16": True}}]
    spec = _project(tmp_path, model, {"steps": steps, "min_speedup": 0.0, "max_drop": 1.0})
    text = spec.read_text().replace("optimize:", "serve: {device: tensorrt}\noptimize:", 1)
    spec.write_text(text)
    manifest = build(load_spec(spec), registry)
    trt = manifest.lineage[-1].params["candidates"][-1]
    folder = registry.path(f"opt:{manifest.version}")
    if "TensorrtExecutionProvider" in ort.get_available_providers():  # a GPU machine with TensorRT
        assert trt["failed_guard"] in (None, "metric", "speed")
        assert (folder / "tensorrt.json").exists() == trt["accepted"]
        return
    assert trt["failed_guard"] == "unavailable"
    assert trt["reason"].startswith("not tried: this machine's onnxruntime has no TensorRT provider")
    assert len(manifest.lineage[-1].params["candidates"]) == 2  # and not tried again on top of the graph step
    assert not (folder / "tensorrt.json").exists()  # nothing chosen: the server runs TensorRT's defaults there
    registry.manifest(f"opt:{manifest.version}", verify=True)


@pytest.mark.parametrize(
    ("steps", "device"),
    [([{"step": "tensorrt"}, {"step": "graph"}], "tensorrt"), ([{"step": "graph"}, {"step": "tensorrt"}], "cuda")],
)
def test_the_tensorrt_step_comes_last_and_with_the_tensorrt_device(steps: list[dict[str, Any]], device: str) -> None:
    with pytest.raises(SpecError, match=r"list it last, with serve\.device: tensorrt"):
        parse_spec({"name": "m", "model": {"format": "onnx", "path": "m.onnx"}, "serve": {"device": device},
                    "evaluation": {"dataset": {"kind": "npz", "path": "e.npz"}, "metric": "accuracy"},
                    "optimize": {"steps": steps}}, "s")  # fmt: skip


def test_tensorrt_runs_with_an_engine_cache_per_artifact_and_the_chosen_precision(tmp_path: Path) -> None:
    from shipyard.settings import Environment

    root = Environment.from_environ({"SHIPYARD_TENSORRT_CACHE": str(tmp_path / "engines")}).tensorrt_cache
    assert Environment.from_environ({}).tensorrt_cache == Path("~/.cache/shipyard/tensorrt").expanduser()
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    default = onnxrt.artifact_tensorrt(artifact, "sha256:0123456789abcdef0123", root)
    assert default == onnxrt.TensorrtRun(tmp_path / "engines" / "sha256-0123456789abcdef", fp16=False)
    (artifact / onnxrt.TENSORRT_FILE).write_text('{"fp16": true}')
    chosen = onnxrt.artifact_tensorrt(artifact, "sha256:0123456789abcdef0123", root)
    assert chosen.fp16
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    listed = onnxrt.provider_list(gpu, chosen)
    name, options = listed[0]
    assert name == "TensorrtExecutionProvider"
    assert options["trt_engine_cache_enable"] == "True"
    assert options["trt_fp16_enable"] == "True"
    assert options["trt_engine_cache_path"] == str(chosen.cache)
    assert chosen.cache.is_dir()
    assert listed[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnxrt.provider_list(["CPUExecutionProvider"], chosen) == ["CPUExecutionProvider"]
