from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shipyard.errors import EvaluationError, ModelLoadError
from shipyard.pipeline.context import EvalData
from shipyard.pipeline.datasets import load_dataset
from shipyard.spec.models import EvaluationSpec, SignatureSpec, TensorSpec

SIG = SignatureSpec(inputs=[TensorSpec(name="img", dtype="float32", shape=["batch", 1, 2, 2])])
TWO = SignatureSpec(
    inputs=[
        TensorSpec(name="ids", dtype="int64", shape=["batch", "seq"]),
        TensorSpec(name="mask", dtype="int64", shape=["batch", "seq"]),
    ]
)


def _eval(dataset: dict[str, object], **kw: object) -> EvaluationSpec:
    return EvaluationSpec.model_validate({"dataset": dataset, "metric": "accuracy", **kw})


def _load(spec: EvaluationSpec, signature: SignatureSpec, base: Path) -> EvalData:
    return load_dataset(spec.dataset, signature, base, spec.max_samples)


def test_npz_is_reshaped_and_cast_to_the_signature(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.arange(12, dtype=np.int64).reshape(3, 4), y=np.array([0, 1, 0]))
    data = _load(_eval({"kind": "npz", "path": "d.npz"}, max_samples=2), SIG, tmp_path)
    assert data.inputs["img"].shape == (2, 1, 2, 2)
    assert data.inputs["img"].dtype == np.float32
    assert len(data) == 2


def test_npz_with_object_arrays_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(EvaluationError, match="object arrays are refused"):
        _load(_eval({"kind": "npz", "path": "d.npz"}), SIG, tmp_path)


def test_npz_missing_keys_and_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", features=np.zeros((2, 4)), y=np.zeros(2))
    with pytest.raises(EvaluationError, match=r"no array named x \(has features, y\); name the arrays") as caught:
        _load(_eval({"kind": "npz", "path": "d.npz"}), SIG, tmp_path)
    assert "`inputs: {INPUT: KEY}`" in str(caught.value)  # the error names the fields that fix it
    renamed = _load(_eval({"kind": "npz", "path": "d.npz", "inputs": {"img": "features"}}), SIG, tmp_path)
    assert renamed.inputs["img"].shape == (2, 1, 2, 2)
    with pytest.raises(EvaluationError, match="dataset file not found"):
        _load(_eval({"kind": "npz", "path": "none.npz"}), SIG, tmp_path)


def test_function_dataset_with_named_inputs(tmp_path: Path) -> None:
    (tmp_path / "evaldata.py").write_text(
        "import numpy as np\n"
        "def load():\n"
        "    ids = np.ones((5, 7), dtype=np.int32)\n"
        "    return {'ids': ids, 'mask': ids}, np.zeros(5)\n"
        "def broken():\n"
        "    raise RuntimeError('no data today')\n"
    )
    data = _load(_eval({"kind": "function", "ref": "evaldata:load"}), TWO, tmp_path)
    assert data.inputs["ids"].dtype == np.int64
    assert data.inputs["mask"].shape == (5, 7)
    with pytest.raises(EvaluationError, match="raised RuntimeError: no data today"):
        _load(_eval({"kind": "function", "ref": "evaldata:broken"}), TWO, tmp_path)
    with pytest.raises(ModelLoadError, match="has no attribute 'nothing'"):
        _load(_eval({"kind": "function", "ref": "evaldata:nothing"}), TWO, tmp_path)


def test_unnamed_array_for_a_multi_input_model(tmp_path: Path) -> None:
    (tmp_path / "flat.py").write_text("import numpy as np\ndef load():\n    return np.ones((2, 3)), np.zeros(2)\n")
    with pytest.raises(EvaluationError, match="the model has 2 inputs"):
        _load(_eval({"kind": "function", "ref": "flat:load"}), TWO, tmp_path)


def test_sklearn_split_is_held_out_and_reproducible(tmp_path: Path) -> None:
    pytest.importorskip("sklearn", reason="the sklearn extra is not installed")
    sig = SignatureSpec(inputs=[TensorSpec(name="x", dtype="float32", shape=["batch", 64])])
    test = _load(_eval({"kind": "sklearn", "name": "digits"}), sig, tmp_path)
    train = _load(_eval({"kind": "sklearn", "name": "digits", "split": "train"}), sig, tmp_path)
    again = _load(_eval({"kind": "sklearn", "name": "digits"}), sig, tmp_path)
    assert len(test) == 450
    assert len(train) == 1347
    assert np.array_equal(test.inputs["x"], again.inputs["x"])
    train_rows = {row.tobytes() for row in train.inputs["x"]}
    overlap = sum(row.tobytes() in train_rows for row in test.inputs["x"])
    assert overlap < 5  # digits has a few exact duplicate images; the split itself is disjoint
