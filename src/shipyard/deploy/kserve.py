"""The KServe target: an InferenceService (v1beta1) whose custom predictor runs the shipyard image."""

from __future__ import annotations

from typing import Any

from shipyard.deploy import docker, kubernetes
from shipyard.deploy.bundle import Bundle, to_yaml
from shipyard.spec.loader import LoadedSpec


def inference_service(loaded: LoadedSpec, bundle: Bundle) -> dict[str, Any]:
    deploy = loaded.spec.deploy
    container = kubernetes.container(loaded, bundle, name="kserve-container")
    # KServe routes one port to the predictor: the REST one (gRPC would need its own h2c port entry).
    container["ports"] = [{"name": "http1", "containerPort": deploy.ports.http, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        container[probe]["httpGet"]["port"] = deploy.ports.http
    predictor: dict[str, Any] = {
        "minReplicas": deploy.min_replicas,
        "maxReplicas": deploy.max_replicas,
        "securityContext": {"runAsNonRoot": True, "runAsUser": docker.USER_ID, "fsGroup": docker.USER_ID},
        "containers": [container],
        **kubernetes.scheduling(loaded),
    }
    if deploy.canary_percent is not None:
        predictor["canaryTrafficPercent"] = deploy.canary_percent
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": kubernetes.app_name(loaded), "namespace": deploy.namespace,
                     "labels": kubernetes.labels(loaded)},
        "spec": {"predictor": predictor},
    }  # fmt: skip


def render(loaded: LoadedSpec, bundle: Bundle) -> None:
    docker.render(loaded, bundle)
    bundle.files["kserve/inferenceservice.yaml"] = to_yaml(inference_service(loaded, bundle))
