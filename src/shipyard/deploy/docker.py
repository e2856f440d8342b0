"""The container target: a Dockerfile and its build context (pinned requirements, the shipyard wheel, models).

No Docker engine is needed to render or test it: the Dockerfile is plain text, and its entrypoint is the
same `shipyard serve` command a virtual environment runs.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from shipyard import __version__
from shipyard.artifact.archive import pack
from shipyard.deploy.bundle import ARCHIVES_IN_CONTAINER, REGISTRY_IN_CONTAINER, Bundle, serve_args, server_env
from shipyard.errors import MissingExtraError, UnavailableError
from shipyard.registry.local import LocalRegistry
from shipyard.spec.loader import LoadedSpec

BASE_IMAGE = "python:3.11-slim-bookworm"
# GPU targets: NVIDIA's CUDA 12 runtime with cuDNN 9 (what onnxruntime-gpu's CUDA 12 build links against),
# and Python from the distribution in a virtual environment.
GPU_BASE_IMAGE = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04"
USER_ID = 10001
CONTEXT = "docker"


def serving_extras(loaded: LoadedSpec) -> tuple[str, ...]:
    """The extras a served container needs beyond the core: `s3` when it pulls its archives from s3://."""
    uri = loaded.spec.deploy.registry_uri
    return ("s3",) if uri is not None and uri.startswith("s3://") else ()


def pinned_requirements(distribution: str = "shipyard", extras: tuple[str, ...] = (), gpu: bool = False) -> list[str]:
    """`name==version` for every package the serving install needs, with the named extras (the serving
    extras never include torch); with `gpu`, ONNX Runtime's GPU build at the same version as the CPU one
    installed here."""
    pins: dict[str, str] = {}
    # Each requirement with the extra it is considered under ("" for the plain install).
    pending = [
        (Requirement(r), extra) for r in importlib.metadata.requires(distribution) or [] for extra in ("", *extras)
    ]
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        if name in pins:
            continue
        try:
            pins[name] = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            raise MissingExtraError(
                f"{requirement.name} is required for serving but not installed here: install it, then render again"
            ) from None
        for text in importlib.metadata.requires(requirement.name) or []:
            pending += [(Requirement(text), wanted) for wanted in ("", *requirement.extras)]
    if gpu:
        pins["onnxruntime-gpu"] = pins.pop("onnxruntime")
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def _exec_form(argv: list[str]) -> str:
    return json.dumps(argv)


def dockerfile(loaded: LoadedSpec, bundle: Bundle) -> str:
    deploy = loaded.spec.deploy
    env = {"SHIPYARD_REGISTRY": REGISTRY_IN_CONTAINER, **server_env(loaded, "0.0.0.0"),
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    health = (
        "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + "
        "os.environ['SHIPYARD_HTTP_PORT'] + '/v2/health/ready', timeout=2)"
    )
    gpu = loaded.spec.serve.device != "cpu"
    lines = [
        f"# Rendered by shipyard {__version__} for {loaded.spec.name}; build it from this folder:",
        f"#   docker build -t {image_name(loaded)} .",
        f"FROM {GPU_BASE_IMAGE if gpu else BASE_IMAGE}",
    ]
    if gpu:  # the CUDA image has no Python of its own: the distribution's, in a virtual environment
        lines += [
            "RUN apt-get update && apt-get install --yes --no-install-recommends python3 python3-venv \\",
            "    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv",
            "ENV PATH=/opt/venv/bin:$PATH",
        ]
        env["NVIDIA_VISIBLE_DEVICES"] = "all"
    lines += [
        "ENV " + " \\\n    ".join(f"{k}={v}" for k, v in env.items()),
        f"RUN groupadd --system --gid {USER_ID} shipyard \\",
        f"    && useradd --system --uid {USER_ID} --gid shipyard --home-dir /var/lib/shipyard --create-home shipyard",
        "WORKDIR /opt/shipyard",
        "COPY requirements.txt ./",
        "RUN pip install --no-cache-dir --requirement requirements.txt",
        "COPY wheels/ ./wheels/",
        "RUN pip install --no-cache-dir --no-deps wheels/*.whl",
    ]
    if deploy.registry_uri is None:  # baked in: verified now, at build time, by the same pull users run
        lines += [f"COPY --chown=shipyard:shipyard archives/ {ARCHIVES_IN_CONTAINER}/", f"USER {USER_ID}"]
        lines += [f"RUN shipyard pull {ARCHIVES_IN_CONTAINER}/{model.archive}" for model in bundle.models]
    else:
        lines.append(f"USER {USER_ID}")
    ports = deploy.ports
    lines += [
        f"EXPOSE {ports.http} {ports.grpc} {ports.metrics}",
        "HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \\",
        f"    CMD {_exec_form(['python', '-c', health])}",
        f"ENTRYPOINT {_exec_form(['shipyard', 'serve'])}",
        f"CMD {_exec_form(serve_args(loaded, bundle.models))}",
    ]
    return "\n".join(lines) + "\n"


def image_name(loaded: LoadedSpec) -> str:
    return loaded.spec.deploy.image or f"shipyard-{loaded.spec.name.lower()}:latest"


def render(loaded: LoadedSpec, bundle: Bundle) -> None:
    """Add the build context's text files to `bundle` under docker/."""
    bundle.files[f"{CONTEXT}/Dockerfile"] = dockerfile(loaded, bundle)
    requirements = pinned_requirements(extras=serving_extras(loaded), gpu=loaded.spec.serve.device != "cpu")
    bundle.files[f"{CONTEXT}/requirements.txt"] = "\n".join(requirements) + "\n"
    bundle.files[f"{CONTEXT}/.dockerignore"] = "**/__pycache__\n*.pyc\n"


def write_assets(loaded: LoadedSpec, bundle: Bundle, registry: LocalRegistry, out: Path) -> None:
    """The binary part of the context: the shipyard wheel and, unless pulled at start, the model archives."""
    context = out / CONTEXT
    wheels = context / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    _build_wheel(wheels)
    if loaded.spec.deploy.registry_uri is None:
        archives = context / "archives"
        archives.mkdir(exist_ok=True)
        for model in bundle.models:
            pack(registry.path(f"{model.name}:{model.version}"), archives / model.archive)


def _build_wheel(dest: Path) -> None:
    """This installation of shipyard as a wheel, built from its source tree (editable and source installs)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file():
        raise UnavailableError("cannot find shipyard's source tree to build the image's wheel from")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dest), str(root)]
    if importlib.util.find_spec("setuptools") is not None:
        command.insert(4, "--no-build-isolation")  # offline: build with the setuptools already here
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise UnavailableError(f"building the shipyard wheel failed: {done.stderr.strip()[-500:]}")
