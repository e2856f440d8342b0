"""Every rendered manifest validates offline: Kubernetes schemas (strict), the InferenceService CRD, the Dockerfile."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from shipyard.deploy.kubernetes import KUBERNETES_VERSION
from shipyard.deploy.releases import render
from shipyard.errors import ShipyardError, SpecError
from shipyard.registry import LocalRegistry
from tests.deploy.conftest import Project

SPECS = Path(__file__).resolve().parents[3] / "shared" / "specs"
IMAGE = "registry.example.com/ml/mlp:1.0"


def _validate_kubernetes(obj: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def _documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def test_kubernetes_objects_validate_against_the_schemas(project: Project, registry: LocalRegistry) -> None:
    bundle = render(project(image=IMAGE, min_replicas=2, max_replicas=5), registry, "kubernetes")
    plain = _documents(bundle.files["kubernetes/manifests.yaml"])
    kinds = sorted(d["kind"] for d in plain)
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "ServiceMonitor"]
    for obj in plain:
        if obj["kind"] == "ServiceMonitor":  # a Prometheus Operator CRD: not in the Kubernetes schemas
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            assert obj["spec"]["endpoints"][0]["port"] == "metrics"
            continue
        _validate_kubernetes(obj)
    deployment = next(d for d in plain if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}
    hpa = next(d for d in plain if d["kind"] == "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)


def test_the_validator_catches_a_misspelled_field() -> None:
    """The check above can fail: strict mode refuses a field Kubernetes does not know."""
    import kubernetes_validate

    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"portz": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_kubernetes(service)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_kustomize_base_builds_the_same_objects(project: Project, registry: LocalRegistry, tmp_path: Path) -> None:
    bundle = render(project(image=IMAGE, max_replicas=3), registry, "kubernetes")
    for path, text in bundle.files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    built = subprocess.run(["kubectl", "kustomize", str(tmp_path / "kubernetes" / "base")],
                           capture_output=True, text=True, check=True)  # fmt: skip
    by_kind = {d["kind"]: d for d in _documents(built.stdout)}
    plain = {d["kind"]: d for d in _documents(bundle.files["kubernetes/manifests.yaml"])}
    assert by_kind == plain


def _crd_schema() -> dict[str, Any]:
    if not SPECS.is_dir():
        pytest.skip("../shared/specs is not beside this checkout (CI checks that it is)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml reads the large CRD several times faster
    crd = yaml.load((SPECS / "kserve-inferenceservice-crd.yaml").read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def test_inference_service_validates_against_the_crd(project: Project, registry: LocalRegistry) -> None:
    import jsonschema

    # A validator made directly: jsonschema.validate() would first check the huge schema itself (~15 s).
    validator = jsonschema.Draft7Validator(_crd_schema())
    bundle = render(project(image=IMAGE, canary_percent=10, max_replicas=3), registry, "kserve")
    (service,) = _documents(bundle.files["kserve/inferenceservice.yaml"])
    validator.validate(service)
    predictor = service["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 10
    assert predictor["containers"][0]["image"] == IMAGE
    broken = {**service, "spec": {"predictor": {**predictor, "minReplicas": "two"}}}
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)


def test_dockerfile_is_non_root_exec_form_with_a_healthcheck(
    project: Project, registry: LocalRegistry, tmp_path: Path
) -> None:
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(str(tmp_path / "Dockerfile"))  # setting content writes the file: keep it in tmp
    parser.content = render(project(), registry, "docker").files["docker/Dockerfile"]
    instructions = {i["instruction"]: i["value"] for i in parser.structure}
    assert parser.baseimage.startswith("python:3.11")
    assert instructions["USER"] == "10001"
    assert "/v2/health/ready" in instructions["HEALTHCHECK"]
    assert instructions["ENTRYPOINT"] == '["shipyard", "serve"]'
    assert instructions["CMD"] == '["mlp"]'
    requirements = render(project(), registry, "docker").files["docker/requirements.txt"].splitlines()
    assert all("==" in line for line in requirements)
    names = {line.split("==")[0] for line in requirements}
    assert {"onnxruntime", "uvicorn", "grpcio"} <= names
    assert "torch" not in names  # serving never needs it


def test_a_gpu_spec_renders_gpu_requests_images_and_requirements(
    project: Project, registry: LocalRegistry, tmp_path: Path
) -> None:
    import jsonschema
    from dockerfile_parse import DockerfileParser

    machine = {"type": "g6e.xlarge", "cpu": "4", "memory": "30Gi", "gpus": 1, "gpu_memory": "48Gi"}
    gpu = project(serve={"device": "cuda"}, image=IMAGE, resources={"gpu": 2}, machine=machine)
    plain = _documents(render(gpu, registry, "kubernetes").files["kubernetes/manifests.yaml"])
    deployment = next(d for d in plain if d["kind"] == "Deployment")
    _validate_kubernetes(deployment)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "g6e.xlarge"}  # the named machine type
    (service,) = _documents(render(gpu, registry, "kserve").files["kserve/inferenceservice.yaml"])
    jsonschema.Draft7Validator(_crd_schema()).validate(service)
    assert service["spec"]["predictor"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert service["spec"]["predictor"]["nodeSelector"] == {"node.kubernetes.io/instance-type": "g6e.xlarge"}
    docker = render(gpu, registry, "docker").files
    requirements = {line.split("==")[0] for line in docker["docker/requirements.txt"].splitlines()}
    assert "onnxruntime-gpu" in requirements
    assert "onnxruntime" not in requirements
    parser = DockerfileParser(str(tmp_path / "Dockerfile"))
    parser.content = docker["docker/Dockerfile"]
    assert parser.baseimage.startswith("nvidia/cuda:12")
    ray = yaml.safe_load(render(gpu, registry, "ray").files["ray/serve_config.yaml"])
    assert ray["applications"][0]["args"]["num_gpus"] == 2
    # The CPU default asks for no GPU anywhere.
    cpu = _documents(render(project(image=IMAGE), registry, "kubernetes").files["kubernetes/manifests.yaml"])
    cpu_pod = next(d for d in cpu if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert "tolerations" not in cpu_pod
    assert "nodeSelector" not in cpu_pod  # no machine type named: any node
    assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]


@pytest.mark.parametrize(
    ("deploy", "target", "message"),
    [
        ({"target": "swarm"}, None, "deploy.target"),
        ({"resources": {"memory": "16Mi"}}, None, "below 128Mi"),
        ({"resources": {"cpu": "10m"}}, None, "below 100m"),
        ({"resources": {"memory": "1Gi", "memory_limit": "512Mi"}}, None, "below the request"),
        ({"target": "kubernetes"}, None, "needs `image`"),
        ({}, "kserve", "deploy.image: target kserve needs the container image"),
        ({"models": ["nothere"]}, "docker", "no model named 'nothere'"),
    ],
)
def test_bad_deploy_settings_give_clear_errors_and_write_nothing(
    project: Project, registry: LocalRegistry, tmp_path: Path, deploy: dict[str, Any], target: str | None,
    message: str,
) -> None:  # fmt: skip
    from shipyard.deploy.apply import apply

    with pytest.raises((SpecError, ShipyardError), match=message):
        apply(project(**deploy), registry, target)
    assert not (tmp_path / "project" / ".shipyard").exists()
    assert not (tmp_path / "project" / "deploy").exists()


def test_a_gpu_model_is_refused_where_there_is_no_gpu_rather_than_run_on_the_cpu(
    project: Project, registry: LocalRegistry, tmp_path: Path
) -> None:
    import onnxruntime as ort

    from shipyard.pipeline import build
    from tests.serve.conftest import serve_until_exit

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    build(project(serve={"device": "cuda"}), registry)  # registered as mlp:2
    refused = serve_until_exit(registry, "mlp:2")
    assert refused.returncode != 0
    assert "needs CUDAExecutionProvider (serve.device: cuda)" in refused.stderr + refused.stdout
    assert "Traceback" not in refused.stderr
