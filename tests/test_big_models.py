"""A model with external weights (the layout of every model over 2 GB; the single-file limit lowered here so
a 48 MB one takes it) through the whole path: optimize (INT8 and 4-bit), encryption, signing, push and
pull, and serving with the key and the signature required."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from shipyard import onnxrt
from shipyard.artifact.signing import generate_keys, sign
from shipyard.pipeline import build
from shipyard.registry import LocalRegistry
from shipyard.registry import remote as remote_storage
from shipyard.settings import KEY_ENV
from shipyard.spec import load_spec
from tests._helpers import make_mlp_onnx, write_spec
from tests.serve.conftest import start_server, stop_server

pytest.importorskip("model_signing")
SIZES = (1024, 2048, 2048, 1024, 10)  # 48 MB of float32 weights


def test_external_weights_go_through_optimize_encryption_signing_push_pull_and_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnxrt, "_SINGLE_FILE_LIMIT", 4 << 20)
    inline = make_mlp_onnx(tmp_path / "inline.onnx", sizes=SIZES)
    model = tmp_path / "project" / "big.onnx"
    model.parent.mkdir()
    onnx.save_model(onnx.load(str(inline)), str(model), save_as_external_data=True, location="big.onnx.data")
    x = np.random.default_rng(1).standard_normal((256, SIZES[0])).astype(np.float32)
    reference = ort.InferenceSession(str(inline), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.savez(model.parent / "eval.npz", x=x, y=reference.argmax(1))
    spec = {"name": "big", "model": {"format": "onnx", "path": "big.onnx"},
            "evaluation": {"dataset": {"kind": "npz", "path": "eval.npz"}, "metric": "accuracy",
                           "latency": {"iterations": 10, "throughput_batch": 8}},
            "optimize": {"steps": [{"step": "quantize_dynamic"}, {"step": "weight_only"}], "max_drop": 0.1,
                         "min_speedup": 0.0}}  # fmt: skip
    key = bytes(range(32))
    registry = LocalRegistry(tmp_path / "registry")
    manifest = build(load_spec(write_spec(model.parent, spec)), registry, encryption_key=key)
    candidates = next(s.params for s in manifest.lineage if s.step == "optimize")["candidates"]
    assert [c["reason"] for c in candidates if c["reason"].startswith("failed")] == []
    folder = registry.path(registry.resolve("big"))
    assert manifest.encryption is not None
    assert manifest.encryption["side_file"] == "model.onnx.data"  # the winner still passes the limit
    sealed = sorted(f.name for f in folder.glob("model.onnx*"))
    assert sealed == ["model.onnx", "model.onnx.data"]
    assert all((folder / name).read_bytes()[:16] == b"SHIPYARD-AESGCM2" for name in sealed)

    private, public = tmp_path / "keys" / "signing.pem", tmp_path / "keys" / "signing.pub.pem"
    generate_keys(private, public)
    sign(folder, private)
    uri = remote_storage.push(registry, "big:1", f"file://{tmp_path / 'remote'}/")
    other = LocalRegistry(tmp_path / "pulled")
    remote_storage.pull(other, uri)

    monkeypatch.setenv(KEY_ENV, __import__("base64").b64encode(key).decode())
    server = start_server(other, tmp_path / "server.log", "big:1",
                          extra_args=("--require-signed", "--public-key", str(public)))  # fmt: skip
    try:
        client = httpclient.InferenceServerClient(server.base().removeprefix("http://"))
        batch = httpclient.InferInput("x", [16, SIZES[0]], "FP32")
        batch.set_data_from_numpy(x[:16])
        got = client.infer("big", [batch]).as_numpy("logits")
        assert got is not None
        assert np.mean(got.argmax(1) == reference[:16].argmax(1)) >= 0.9
        client.close()
    finally:
        assert stop_server(server) == 0
    assert "Traceback" not in server.log.read_text()
