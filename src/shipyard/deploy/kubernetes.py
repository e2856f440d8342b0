"""The Kubernetes target: Deployment, Service, HPA, PodDisruptionBudget and ServiceMonitor, as a kustomize base
and as one plain manifest file. Probes use the Open Inference Protocol's health endpoints."""

from __future__ import annotations

from typing import Any

from shipyard.deploy import docker
from shipyard.deploy.bundle import (
    GPU_TOLERATION,
    REGISTRY_IN_CONTAINER,
    Bundle,
    gpus,
    serve_args,
    server_env,
    to_yaml,
)
from shipyard.spec.loader import LoadedSpec

FOLDER = "kubernetes"
KUBERNETES_VERSION = "1.30.0"  # the API versions used here are stable from 1.23 on; tests validate against this


def app_name(loaded: LoadedSpec) -> str:
    """A DNS-1035 label from the model name (Kubernetes object names)."""
    cleaned = "".join(c if c.isalnum() else "-" for c in loaded.spec.name.lower()).strip("-")
    return (cleaned if cleaned[:1].isalpha() else f"m-{cleaned}")[:63].rstrip("-")


def labels(loaded: LoadedSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": app_name(loaded), "app.kubernetes.io/managed-by": "shipyard"}


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures,
            "timeoutSeconds": 2}  # fmt: skip


def resources(loaded: LoadedSpec) -> dict[str, Any]:
    spec = loaded.spec.deploy.resources
    limits: dict[str, Any] = {"memory": spec.memory_limit or spec.memory}
    if spec.cpu_limit is not None:
        limits["cpu"] = spec.cpu_limit
    if gpus(loaded):  # an extended resource: the limit is the request (the NVIDIA device plugin's)
        limits["nvidia.com/gpu"] = gpus(loaded)
    return {"requests": {"cpu": spec.cpu, "memory": spec.memory}, "limits": limits}


def scheduling(loaded: LoadedSpec) -> dict[str, Any]:
    """Pod fields that place a replica: onto the spec's machine type (the well-known instance-type label),
    and for a GPU replica onto GPU nodes, which clusters usually taint."""
    fields: dict[str, Any] = {"tolerations": [GPU_TOLERATION]} if gpus(loaded) else {}
    machine = loaded.spec.deploy.machine
    if machine is not None and machine.type is not None:
        fields["nodeSelector"] = {"node.kubernetes.io/instance-type": machine.type}
    return fields


def container(loaded: LoadedSpec, bundle: Bundle, name: str = "shipyard") -> dict[str, Any]:
    """The server container (the image built from the docker/ context), shared by the Deployment and KServe."""
    deploy = loaded.spec.deploy
    env = {"SHIPYARD_REGISTRY": REGISTRY_IN_CONTAINER, **server_env(loaded, "0.0.0.0")}
    ports = [("http", deploy.ports.http), ("grpc", deploy.ports.grpc), ("metrics", deploy.ports.metrics)]
    return {
        "name": name,
        "image": docker.image_name(loaded),
        "imagePullPolicy": "IfNotPresent",
        "args": serve_args(loaded, bundle.models),
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "ports": [{"name": port_name, "containerPort": port, "protocol": "TCP"} for port_name, port in ports],
        "startupProbe": _probe("/v2/health/ready", 2, 90),  # loading + warm-up: up to 3 minutes
        "readinessProbe": _probe("/v2/health/ready", 5, 2),
        "livenessProbe": _probe("/v2/health/live", 10, 3),
        "resources": resources(loaded),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def objects(loaded: LoadedSpec, bundle: Bundle) -> dict[str, dict[str, Any]]:
    """File name -> Kubernetes object."""
    deploy, name, tags = loaded.spec.deploy, app_name(loaded), labels(loaded)
    meta = {"name": name, "namespace": deploy.namespace, "labels": tags}
    selector = {"app.kubernetes.io/name": name}
    pod = {
        "metadata": {"labels": tags},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": docker.USER_ID, "fsGroup": docker.USER_ID,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container(loaded, bundle)],
            "terminationGracePeriodSeconds": 30,  # the server drains in-flight requests on SIGTERM
            **scheduling(loaded),
        },
    }  # fmt: skip
    result: dict[str, dict[str, Any]] = {
        "deployment.yaml": {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
            "spec": {"replicas": max(1, deploy.min_replicas), "selector": {"matchLabels": selector},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                     "template": pod},
        },
        "service.yaml": {
            "apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"type": "ClusterIP", "selector": selector,
                     "ports": [{"name": n, "port": p, "targetPort": n, "protocol": "TCP"}
                               for n, p in (("http", deploy.ports.http), ("grpc", deploy.ports.grpc),
                                            ("metrics", deploy.ports.metrics))]},
        },
        "pdb.yaml": {
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta,
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
        },
        "servicemonitor.yaml": {
            "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": meta,
            "spec": {"selector": {"matchLabels": selector},
                     "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}]},
        },
    }  # fmt: skip
    if deploy.max_replicas > 1:
        result["hpa.yaml"] = {
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta,
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                     "minReplicas": max(1, deploy.min_replicas), "maxReplicas": deploy.max_replicas,
                     "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                         "type": "Utilization", "averageUtilization": deploy.target_cpu_percent}}}]},
        }  # fmt: skip
    return result


def render(loaded: LoadedSpec, bundle: Bundle) -> None:
    docker.render(loaded, bundle)
    parts = objects(loaded, bundle)
    for file_name, obj in parts.items():
        bundle.files[f"{FOLDER}/base/{file_name}"] = to_yaml(obj)
    bundle.files[f"{FOLDER}/base/kustomization.yaml"] = to_yaml({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": loaded.spec.deploy.namespace, "resources": list(parts),
    })  # fmt: skip
    bundle.files[f"{FOLDER}/manifests.yaml"] = to_yaml(*parts.values())
