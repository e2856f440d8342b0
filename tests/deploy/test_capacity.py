"""Capacity planning measures the model here, and its plan sizes the rendered deployment."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from shipyard.deploy.capacity import machine_fit, misfit, plan_capacity, save_plan
from shipyard.deploy.releases import render
from shipyard.errors import ConflictError, InvalidInputError
from shipyard.pipeline import build
from shipyard.registry import LocalRegistry
from shipyard.spec import load_spec
from tests._helpers import causal_spec, make_hf_causal, write_spec
from tests.deploy.conftest import Project


def test_plan_is_consistent_with_its_measured_curve(registry: LocalRegistry) -> None:
    plan = plan_capacity(registry, "mlp", qps=200_000, p99_ms=50, utilization=0.5, max_batch=16, seconds=0.05)
    assert sorted({p.batch for p in plan.curve}) == [1, 2, 4, 8, 16]
    assert all(p.samples_per_s > 0 and p.p99_ms >= p.p50_ms > 0 for p in plan.curve)
    chosen = next(p for p in plan.curve if p.batch == plan.batch and p.concurrency == 1)
    assert plan.per_replica_qps == chosen.samples_per_s
    assert plan.replicas == math.ceil(200_000 / (chosen.samples_per_s * 0.5))
    assert plan.headroom == pytest.approx(plan.replicas * chosen.samples_per_s / 200_000 - 1)
    assert plan.headroom >= 1.0  # planned at 50 % utilisation: at least twice the target
    assert plan.expected_p99_ms <= 50
    assert 20 < plan.peak_rss_mib < 2048
    assert plan.memory.endswith("Mi")
    assert int(plan.memory[:-2]) >= plan.peak_rss_mib


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"qps": 100, "p99_ms": 0.000001}, ConflictError, "cannot be met"),
        ({"qps": 0, "p99_ms": 10}, InvalidInputError, "must be positive"),
        ({"qps": 10, "p99_ms": 10, "utilization": 1.5}, InvalidInputError, "utilization"),
    ],
)
def test_impossible_or_bad_targets_are_explained(
    registry: LocalRegistry, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        plan_capacity(registry, "mlp", max_batch=2, seconds=0.02, **kwargs)


def test_a_saved_plan_sizes_kubernetes_unless_the_spec_says_otherwise(
    project: Project, registry: LocalRegistry
) -> None:
    loaded = project(image="example.com/mlp:1")
    plan = plan_capacity(registry, "mlp", qps=500_000, p99_ms=50, max_batch=4, seconds=0.05)
    save_plan(plan, loaded)

    def deployment(loaded: Any) -> dict[str, Any]:
        text = render(loaded, registry, "kubernetes").files["kubernetes/manifests.yaml"]
        return next(d for d in yaml.safe_load_all(text) if d["kind"] == "Deployment")

    sized = deployment(loaded)
    assert sized["spec"]["replicas"] == plan.replicas
    assert sized["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] == {
        "cpu": plan.cpu, "memory": plan.memory,
    }  # fmt: skip
    explicit = deployment(project(image="example.com/mlp:1", resources={"cpu": "2", "memory": "3Gi"}))
    assert explicit["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] == {
        "cpu": "2", "memory": "3Gi",
    }  # fmt: skip


def test_a_replica_too_small_for_the_model_is_named(project: Project, registry: LocalRegistry) -> None:
    plan = plan_capacity(registry, "mlp", qps=500, p99_ms=50, max_batch=2, seconds=0.05)
    assert misfit(plan, project()) is None  # no resources in the spec: the plan sizes them
    roomy = project(resources={"cpu": "1", "memory": "64Gi"})
    assert misfit(plan, roomy) is None
    small = project(resources={"cpu": "1", "memory": "128Mi"})
    problem = misfit(plan, small)
    assert problem is not None
    assert f"memory limit is 128Mi, the plan needs {plan.memory}" in problem


def test_the_plan_says_how_many_replicas_a_machine_type_holds_or_that_none_fits(
    project: Project, registry: LocalRegistry, cli: Callable[..., Any]
) -> None:
    plan = plan_capacity(registry, "mlp", qps=500_000, p99_ms=50, max_batch=2, seconds=0.05)
    assert plan.estimate_mib >= 128  # the server's own check: weights, working memory (128 MiB floor)
    assert int(plan.memory[:-2]) >= plan.estimate_mib  # a replica sized by the plan passes that check
    assert machine_fit(plan, project()) is None

    def capacity(loaded: Any, *extra: str) -> Any:  # the project fixture rewrites one spec file: use it at once
        result = cli("capacity", "mlp", "--qps", "500", "--p99", "50ms", "--max-batch", "2", "--spec",
                     str(loaded.path), "-r", str(registry.root), *extra)  # fmt: skip
        assert result.code == 0, result.err
        return result

    big = project(machine={"type": "c7i.2xlarge", "cpu": "8", "memory": "64Gi"})
    fit = machine_fit(plan, big)
    assert fit is not None
    assert (fit.per_machine, fit.bound, fit.needs) == (8, "cpu", "1 of 8")  # one CPU per replica (the plan's)
    assert fit.machines == math.ceil(plan.replicas / 8)
    shown = json.loads(capacity(big, "--json").out)
    assert shown["machine"]["machine"] == "c7i.2xlarge (8 CPU, 64Gi)"
    assert (shown["machine"]["per_machine"], shown["machine"]["machines"]) == (8, math.ceil(shown["replicas"] / 8))

    small = project(resources={"cpu": "1", "memory": "4Gi"}, machine={"type": "t3.medium", "cpu": "2", "memory": "3Gi"})
    none = machine_fit(plan, small)
    assert none is not None
    assert (none.per_machine, none.machines, none.bound, none.needs) == (0, 0, "memory", "4Gi of 3Gi")
    warned = " ".join(capacity(small).err.split())
    assert "mlp:1 does not fit t3.medium (2 CPU, 3Gi): one replica needs memory 4Gi of 3Gi" in warned

    gpu = project(serve={"device": "cuda"}, machine={"cpu": "32", "memory": "256Gi", "gpus": 4, "gpu_memory": "1Gi"})
    on_gpus = machine_fit(plan, gpu)
    assert on_gpus is not None
    assert (on_gpus.per_machine, on_gpus.bound) == (4, "gpus")  # one GPU per replica by default
    tiny = project(serve={"device": "cuda"}, machine={"cpu": "32", "memory": "256Gi", "gpus": 4, "gpu_memory": "64Mi"})
    refused = machine_fit(plan, tiny)
    assert refused is not None
    assert (refused.per_machine, refused.bound) == (0, "gpu memory")
    assert refused.needs == f"{math.ceil(plan.estimate_mib)}Mi of 1 x 64Mi"


def test_capacity_command_prints_json(registry: LocalRegistry, cli: Callable[..., Any]) -> None:
    result = cli("capacity", "mlp", "--qps", "500", "--p99", "0.05s", "--max-batch", "2", "--json",
                 "--registry", str(registry.root))  # fmt: skip
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["p99_target_ms"] == 50
    assert data["replicas"] >= 1
    bad = cli("capacity", "mlp", "--qps", "500", "--p99", "soon", "--registry", str(registry.root))
    assert bad.code == 2
    assert "not a duration" in bad.err


def test_a_language_model_is_refused_with_a_reason(tmp_path: Path, registry: LocalRegistry) -> None:
    make_hf_causal(tmp_path / "hf")
    build(load_spec(write_spec(tmp_path, causal_spec())), registry)
    with pytest.raises(InvalidInputError, match="language model"):
        plan_capacity(registry, "lm", qps=10, p99_ms=100)


def test_a_text_model_is_timed_at_its_tokenizer_length_and_says_so(
    tmp_path: Path, registry: LocalRegistry, cli: Callable[..., Any]
) -> None:
    """It used to time 8-token inputs whatever the model served (about 20x too optimistic for MiniLM)."""
    from tests.serve.core.test_text import SPEC, make_text_model

    make_text_model(tmp_path)
    build(load_spec(write_spec(tmp_path, SPEC)), registry)
    plan = plan_capacity(registry, "bag", qps=10, p99_ms=1000, max_batch=4, seconds=0.05)
    assert plan.inputs == {"input_ids": ["batch", 16], "attention_mask": ["batch", 16]}  # max_length: 16
    short = plan_capacity(registry, "bag", qps=10, p99_ms=1000, max_batch=4, seconds=0.05, sequence=4)
    assert short.inputs["input_ids"] == ["batch", 4]
    shown = cli("capacity", "bag", "--qps", "10", "--p99", "1s", "--max-batch", "2", "-r", str(registry.root))
    assert shown.code == 0, shown.err
    assert "inputs input_ids [batch, 16], attention_mask [batch, 16]" in " ".join(shown.out.split())
