from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shipyard.errors import UnsafeModelError
from shipyard.pipeline import build
from shipyard.pipeline.datasets import sklearn_split
from shipyard.registry import LocalRegistry
from shipyard.spec import load_spec
from shipyard.spec.models import SklearnDatasetSpec
from tests._helpers import write_spec
from tests.conftest import CliResult

sklearn = pytest.importorskip("sklearn", reason="the sklearn extra is not installed")
sio = pytest.importorskip("skops.io", reason="the sklearn extra is not installed")

from sklearn.linear_model import LogisticRegression, Ridge  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402


def _fit(name: str, estimator: Any) -> Any:
    x_train, _, y_train, _ = sklearn_split(SklearnDatasetSpec(kind="sklearn", name=name))  # type: ignore[arg-type]
    return estimator.fit(x_train, y_train)


def _spec(folder: Path, path: str, dataset: str, metric: str, **model: Any) -> Path:
    return write_spec(
        folder,
        {
            "name": "sk",
            "model": {"format": "sklearn", "path": path, **model},
            "evaluation": {
                "dataset": {"kind": "sklearn", "name": dataset},
                "metric": metric,
                "latency": {"iterations": 20},
            },
        },
    )


def test_skops_classifier_pipeline(tmp_path: Path, registry: LocalRegistry) -> None:
    model = _fit("iris", make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)))
    sio.dump(model, tmp_path / "clf.skops")
    manifest = build(load_spec(_spec(tmp_path, "clf.skops", "iris", "accuracy")), registry)
    assert [t.name for t in manifest.signature.outputs] == ["label", "probabilities"]
    assert manifest.signature.inputs[0].shape == ["batch", 4]
    assert manifest.metrics["accuracy"] == manifest.metrics["accuracy_original"]
    assert manifest.metrics["accuracy"] > 0.85
    assert manifest.lineage[1].params["converter"] == "skl2onnx"


def test_regressor_with_mse(tmp_path: Path, registry: LocalRegistry) -> None:
    sio.dump(_fit("diabetes", Ridge()), tmp_path / "reg.skops")
    manifest = build(load_spec(_spec(tmp_path, "reg.skops", "diabetes", "mse")), registry)
    assert manifest.metrics["mse"] == pytest.approx(manifest.metrics["mse_original"], rel=1e-4)


def test_pickle_is_refused_unless_trusted(tmp_path: Path, registry: LocalRegistry) -> None:
    (tmp_path / "clf.pkl").write_bytes(pickle.dumps(_fit("iris", LogisticRegression(max_iter=500))))
    with pytest.raises(UnsafeModelError, match=r"is a pickle: unpickling runs arbitrary code.*skops"):
        build(load_spec(_spec(tmp_path, "clf.pkl", "iris", "accuracy")), registry)
    assert registry.all_versions() == []
    manifest = build(load_spec(_spec(tmp_path, "clf.pkl", "iris", "accuracy", trust_pickle=True)), registry)
    assert manifest.metrics["accuracy"] > 0.85


def test_a_trusted_joblib_with_a_dangerous_import_is_refused(tmp_path: Path, registry: LocalRegistry) -> None:
    import joblib

    marker = tmp_path / "pwned"
    joblib.dump({"estimator": _ShellPayload(str(marker))}, tmp_path / "clf.joblib")
    with pytest.raises(UnsafeModelError, match=r"would import posix\.system"):
        build(load_spec(_spec(tmp_path, "clf.joblib", "iris", "accuracy", trust_pickle=True)), registry)
    assert not marker.exists()
    assert registry.all_versions() == []


@pytest.mark.parametrize("suffix", [".joblib", ".pkl"])
def test_a_callable_no_deny_list_named_is_refused_too(
    tmp_path: Path, cli: Callable[..., CliResult], suffix: str
) -> None:
    """multiprocessing.util.spawnv_passfds ran its command during `shipyard build` with `trust_pickle: true`
    under the old deny-list scan; the allow-list refuses it, through the real command line."""
    import multiprocessing.util

    import joblib

    marker = tmp_path / "pwned"
    payload = _Reduce(multiprocessing.util.spawnv_passfds, ("/bin/sh", ["sh", "-c", f"touch {marker}"], ()))
    joblib.dump({"estimator": payload}, tmp_path / f"clf{suffix}")
    spec = _spec(tmp_path, f"clf{suffix}", "iris", "accuracy", trust_pickle=True)
    result = cli("build", str(spec), "--registry", str(tmp_path / "registry"))
    assert result.code == 5, result.err
    assert "would import multiprocessing.util.spawnv_passfds" in " ".join(result.err.split())
    assert not marker.exists()


class _Reduce:
    def __init__(self, function: Any, args: tuple[Any, ...]) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.function, self.args)


class _ShellPayload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (f"touch {self.marker}",))


class Custom(LogisticRegression):  # a type outside scikit-learn: not trusted in a .skops file
    pass


def test_skops_with_foreign_types_is_refused(tmp_path: Path, registry: LocalRegistry) -> None:
    sio.dump(_fit("iris", Custom(max_iter=500)), tmp_path / "custom.skops")
    with pytest.raises(UnsafeModelError, match="outside scikit-learn"):
        build(load_spec(_spec(tmp_path, "custom.skops", "iris", "accuracy")), registry)
    assert registry.all_versions() == []
