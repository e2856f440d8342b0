"""The local target: the server as a supervised background process, with a state file for status and stop.

The supervisor (`python -m shipyard.deploy.supervisor`) restarts the server if it dies and forwards
SIGTERM so the server drains. `service.json` (rendered, diffed by plan) says what to run; the state file
says what runs now.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shipyard.deploy.bundle import Bundle, server_env
from shipyard.deploy.supervisor import server_ready
from shipyard.errors import UnavailableError
from shipyard.registry.local import LocalRegistry
from shipyard.spec.loader import LoadedSpec

SERVICE_FILE = "local/service.json"


def render(loaded: LoadedSpec, bundle: Bundle, registry: LocalRegistry) -> None:
    refs = [f"{m.name}:{m.version}" for m in bundle.models]  # the local registry keeps version numbers
    service = {
        "argv": [sys.executable, "-m", "shipyard", "serve", *refs, "--registry", str(registry.root)],
        "env": server_env(loaded, "127.0.0.1"),
    }
    bundle.files[SERVICE_FILE] = json.dumps(service, indent=2) + "\n"


@dataclass(frozen=True)
class ServiceState:
    """What runs now: written when a service starts, removed when it stops."""

    release: int
    supervisor_pid: int
    http_port: int
    models: list[str]
    log: str
    started_at: float


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalService:
    """Start, inspect and stop the background service whose state lives in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.state_file = folder / "state.json"

    def state(self) -> ServiceState | None:
        """The running service, or None (a state file left by a dead supervisor is removed)."""
        try:
            state = ServiceState(**json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            self.state_file.unlink()
            return None
        if not _alive(state.supervisor_pid):
            self.state_file.unlink()
            return None
        return state

    def ready(self, state: ServiceState) -> bool:
        return server_ready(state.http_port)

    def start(self, service_json: Path, release: int, models: list[str], timeout_s: float = 120) -> ServiceState:
        """Start the supervisor for `service_json` and wait until the server is ready."""
        self.folder.mkdir(parents=True, exist_ok=True)
        service = json.loads(service_json.read_text())
        log, ready = self.folder / "server.log", self.folder / "ready"
        ready.unlink(missing_ok=True)
        launched = subprocess.run(
            [sys.executable, "-m", "shipyard.deploy.supervisor", str(service_json), str(log)],
            capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if launched.returncode != 0:
            raise UnavailableError(f"cannot start the supervisor: {launched.stderr.strip()[-300:]}")
        state = ServiceState(release, int(launched.stdout.split()[-1]), int(service["env"]["SHIPYARD_HTTP_PORT"]),
                             models, str(log), time.time())  # fmt: skip
        self.state_file.write_text(json.dumps(asdict(state), indent=2))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(state.supervisor_pid):
            if ready.exists():  # the supervisor saw it ready: a crash from now on is restarted
                return state
            time.sleep(0.1)
        self.stop()
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-5:])
        raise UnavailableError(f"the local service did not become ready; last log lines:\n{tail}")

    def stop(self, timeout_s: float = 30) -> ServiceState | None:
        """SIGTERM the supervisor (the server drains), SIGKILL after `timeout_s`; returns what was stopped."""
        state = self.state()
        if state is None:
            return None
        os.kill(state.supervisor_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(state.supervisor_pid):
            time.sleep(0.1)
        if _alive(state.supervisor_pid):
            os.killpg(state.supervisor_pid, signal.SIGKILL)
        self.state_file.unlink(missing_ok=True)
        return state
