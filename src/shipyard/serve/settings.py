"""Process-level serving configuration, frozen once the entry point (CLI, Ray replica) has read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from shipyard import settings as defaults


@dataclass(frozen=True)
class ServeSettings:
    """How one server process runs; per-model settings come from each model's spec (ServeSpec)."""

    models: list[str]
    host: str = "127.0.0.1"
    http_port: int = defaults.HTTP_PORT
    grpc_port: int = defaults.GRPC_PORT
    metrics_port: int = defaults.METRICS_PORT  # 0 disables the metrics listener
    max_body_bytes: int = defaults.MAX_BODY_BYTES
    drain_seconds: float = 30.0
    trusted_key: Path | None = None  # serve only versions signed with this public key's private half
    encryption_key: bytes | None = field(default=None, repr=False)  # opens sealed model files in memory
    tokens_file: Path | None = None  # bearer tokens (sha256 digests + scopes); None: no authentication
    allow_management: bool = False  # the repository load/unload API
    open_health: bool = True  # health endpoints answer without a token
    rate_limit: float | None = None  # requests per second per caller (token name, or client address)
    rate_burst: int = 50
    tls_cert: Path | None = None  # PEM certificate chain and key: HTTPS and gRPC over TLS
    tls_key: Path | None = None
    request_timeout_s: float | None = defaults.REQUEST_TIMEOUT_S  # per inference request, queueing included
    body_timeout_s: float = defaults.BODY_TIMEOUT_S  # to receive a request body, from its first byte awaited
    max_elements: int | None = defaults.MAX_ELEMENTS  # per input tensor
    memory_limit_bytes: int | None = None  # refuse a version whose estimate exceeds this; None: what is free here
    tensorrt_cache: Path | None = None  # where TensorRT's engines are kept, per artifact; None: built each start
    canary: dict[str, dict[int, float]] = field(default_factory=dict)  # name -> {version: share of traffic}
    shadow: dict[str, dict[int, float]] = field(default_factory=dict)  # name -> {version: share mirrored}
    drift_sample: float = 0.1  # share of requests binned for drift monitoring (0: off)
    log_dir: Path | None = None  # sampled request/response JSON lines go here
    log_sample: float = 0.01
    log_max_bytes: int = 10 << 20
    log_redact: bool = False
    grpc_frontend: Literal["auto", "native", "python"] = "auto"  # auto: native when it is built
    workers: int = 1  # processes answering on the same addresses (serve/fleet): each loads every model
    report_file: Path | None = None  # {"pid", "http_port"} once ready, removed at shutdown: a supervisor's proof
