"""The serve command: registry versions on the Open Inference Protocol (REST + gRPC)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from shipyard import settings as defaults
from shipyard.cli._common import RegistryOption, environment, err, registry_at
from shipyard.errors import InvalidInputError, NotFoundError
from shipyard.registry import remote as remote_storage
from shipyard.registry.refs import parse_ref

app = typer.Typer()


@app.command()
def serve(
    models: list[str] = typer.Argument(None, help="NAME, NAME:VERSION or NAME@ALIAS to serve (default: every model)."),
    registry: str | None = RegistryOption,
    host: str = typer.Option("127.0.0.1", "--host", envvar="SHIPYARD_HOST", help="Address to listen on."),
    http_port: int = typer.Option(defaults.HTTP_PORT, "--http-port", envvar="SHIPYARD_HTTP_PORT", help="REST port."),
    grpc_port: int = typer.Option(defaults.GRPC_PORT, "--grpc-port", envvar="SHIPYARD_GRPC_PORT", help="gRPC port."),
    metrics_port: int = typer.Option(
        defaults.METRICS_PORT,
        "--metrics-port",
        envvar="SHIPYARD_METRICS_PORT",
        help="Prometheus metrics port (0: off).",
    ),
    max_body_mb: float = typer.Option(
        defaults.MAX_BODY_BYTES / (1 << 20), "--max-body-mb", help="Largest request body accepted (413 above)."
    ),
    pull_uris: list[str] = typer.Option(
        [], "--pull", help="Archive URI to pull (verified) into the registry before serving; repeatable."
    ),
    require_signed: bool = typer.Option(
        False, "--require-signed", help="Serve only versions signed for --public-key; refuse (and report) others."
    ),
    public_key: Path | None = typer.Option(None, "--public-key", help="Public key (PEM) signatures must match."),
    tokens: Path | None = typer.Option(None, "--tokens", help="Token file (shipyard token add): require tokens."),
    auth_health: bool = typer.Option(False, "--auth-health", help="Require a token on the health endpoints too."),
    allow_management: bool = typer.Option(
        False, "--allow-management", help="Enable repository load/unload (needs --tokens: the admin scope)."
    ),
    insecure_management: bool = typer.Option(
        False,
        "--insecure-management",
        help="Enable repository load/unload without --tokens: anyone who reaches the port may load and unload.",
    ),
    rate_limit: float | None = typer.Option(None, "--rate-limit", help="Requests/s per caller (429 above)."),
    rate_burst: int = typer.Option(50, "--rate-burst", help="Requests a caller may send at once."),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="PEM certificate (chain): HTTPS and gRPC TLS."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="PEM private key for --tls-cert."),
    request_timeout: float = typer.Option(
        defaults.REQUEST_TIMEOUT_S, "--request-timeout", help="Seconds per request (504 after; 0: none)."
    ),
    body_timeout: float = typer.Option(
        defaults.BODY_TIMEOUT_S, "--body-timeout", min=0.1, help="Seconds to receive a request body (408 after)."
    ),
    max_elements: int = typer.Option(
        defaults.MAX_ELEMENTS, "--max-elements", help="Largest input tensor, in elements (413 above)."
    ),
    memory_limit: str | None = typer.Option(
        None,
        "--memory-limit",
        help="Memory budget, e.g. 2Gi: a version estimated above it is not loaded "
        "(default: what the machine or container has free).",
    ),
    canary: list[str] = typer.Option([], "--canary", help="NAME:VERSION=PERCENT of versionless requests; repeatable."),
    shadow: list[str] = typer.Option([], "--shadow", help="NAME:VERSION=PERCENT mirrored, compared, not returned."),
    drift_sample: float = typer.Option(0.1, "--drift-sample", help="Share of requests binned for drift (0: off)."),
    log_requests: Path | None = typer.Option(None, "--log-requests", help="Folder for sampled request JSON lines."),
    log_sample: float = typer.Option(0.01, "--log-sample", help="Share of requests logged."),
    log_max_mb: float = typer.Option(10, "--log-max-mb", help="Rotate the log file at this size."),
    log_redact: bool = typer.Option(False, "--log-redact", help="Log shapes and hashes only, no tensor values."),
    workers: str = typer.Option(
        "1",
        "--workers",
        envvar="SHIPYARD_WORKERS",
        help="Worker processes answering on the same ports, each with every model (auto: one per usable CPU, "
        "as many as fit in memory).",
    ),
    grpc_frontend: str = typer.Option(
        "auto",
        "--grpc-frontend",
        help="gRPC server: native (C++, built by scripts/setup.sh where libgrpc++ is installed), python "
        "(grpc.aio), or auto (native when built).",
    ),
    report_file: Path | None = typer.Option(
        None, "--report-file", hidden=True, help="For supervisors: written when ready."
    ),
) -> None:
    """Serve registry versions over the Open Inference Protocol (REST + gRPC) with dynamic batching."""
    import logging

    import uvloop

    from shipyard.serve.policy.rollout import parse_rules
    from shipyard.serve.server import run
    from shipyard.serve.settings import ServeSettings

    if require_signed and public_key is None:
        raise InvalidInputError("--require-signed needs --public-key: the key signatures must match")
    if (tls_cert is None) != (tls_key is None):
        raise InvalidInputError("--tls-cert and --tls-key go together")
    if allow_management and tokens is None and not insecure_management:
        raise InvalidInputError(
            "--allow-management without --tokens lets anyone who reaches the port load and unload models: give "
            "--tokens FILE (load/unload then need a token with the admin scope), or say --insecure-management"
        )
    env = environment()
    reg = registry_at(registry, env)
    for uri in pull_uris:
        pulled = remote_storage.pull(reg, uri, env.storage_schemes)
        err.print(f"pulled {uri} as {pulled.name}:{pulled.version}")
    refs = list(models or []) or reg.models()
    if not refs:
        raise NotFoundError(f"no models to serve in {reg.root}")
    settings = ServeSettings(
        models=refs, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
        max_body_bytes=int(max_body_mb * (1 << 20)), trusted_key=public_key if require_signed else None,
        encryption_key=env.encryption_key(), tensorrt_cache=env.tensorrt_cache,
        tokens_file=tokens, allow_management=allow_management or insecure_management, open_health=not auth_health,
        rate_limit=rate_limit,
        rate_burst=rate_burst, tls_cert=tls_cert, tls_key=tls_key, request_timeout_s=request_timeout or None,
        body_timeout_s=body_timeout,
        max_elements=max_elements, memory_limit_bytes=_memory_limit(memory_limit),
        canary=parse_rules(canary, "canary"), shadow=parse_rules(shadow, "shadow"),
        drift_sample=drift_sample, log_dir=log_requests, log_sample=log_sample,
        log_max_bytes=int(log_max_mb * (1 << 20)), log_redact=log_redact, report_file=report_file,
        grpc_frontend=_choice(grpc_frontend, "--grpc-frontend", ("auto", "native", "python")),
    )  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    count = _workers(workers)
    if count != 1:
        from shipyard.serve.fleet.supervisor import Supervisor, worker_count

        records = [reg.resolve(parse_ref(ref)) for ref in refs]  # a name that does not exist stops it here
        settings = replace(settings, workers=worker_count(count, records, reg, settings.memory_limit_bytes))
        if settings.workers > 1:
            uvloop.run(Supervisor(settings, reg).run())
            return
    uvloop.run(run(settings, reg))


def _choice(text: str, flag: str, choices: tuple[str, ...]) -> Any:
    if text not in choices:
        raise InvalidInputError(f"{flag} {text!r}: choose one of {', '.join(choices)}")
    return text


def _workers(text: str) -> int | None:
    """--workers: a positive count, or None for auto."""
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise InvalidInputError(f"--workers {text!r}: write a positive number or auto")
    return int(text)


def _memory_limit(text: str | None) -> int | None:
    """A Kubernetes-style quantity (512Mi, 2Gi, 1e9) as bytes; InvalidInputError for anything else."""
    if text is None:
        return None
    from shipyard.spec.models import QUANTITY_PATTERN, quantity

    if not re.fullmatch(QUANTITY_PATTERN, text):
        raise InvalidInputError(f"--memory-limit {text!r} is not a quantity like 512Mi or 2Gi")
    return int(quantity(text))
