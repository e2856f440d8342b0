"""The local target: the server as a supervised background process, with a state file for status and stop.

The supervisor (`python -m shipyard.deploy.supervisor`) restarts the server if it dies and forwards
SIGTERM so the server drains. `service.json` (rendered, diffed by plan) says what to run; the state file
says what runs now.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shipyard.deploy.bundle import Bundle, server_env
from shipyard.deploy.supervisor import REPORT_FILE, reported_by, server_ready
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


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, …], or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """A running process (a zombie left by a killed supervisor whose parent never reaps it is not)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _group(pgid: int) -> list[int]:
    """The live processes of a process group: a supervisor's session, the server it started included."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if (fields := _stat(pid)) is not None and fields[0] != "Z" and int(fields[2]) == pgid]


class LocalService:
    """Start, inspect and stop the background service whose state lives in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.state_file = folder / "state.json"

    def state(self) -> ServiceState | None:
        """The service, running or orphaned (its supervisor died but its server still runs); None when nothing
        of it is left (a stale state file is removed)."""
        try:
            state = ServiceState(**json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            self.state_file.unlink()
            return None
        if not _group(state.supervisor_pid):  # the supervisor's session: it and the server it started
            self.state_file.unlink()
            return None
        return state

    def supervised(self, state: ServiceState) -> bool:
        """False for an orphan: the supervisor is gone, so a server that dies now is not restarted."""
        return _alive(state.supervisor_pid)

    def ready(self, state: ServiceState) -> bool:
        """Our own server reported ready, is still alive in our session, and answers its readiness probe."""
        report = self.folder / REPORT_FILE
        try:
            pid = int(json.loads(report.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return pid in _group(state.supervisor_pid) and reported_by(report, pid) and server_ready(state.http_port)

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
        """SIGTERM the supervisor (it drains the server), or an orphaned server itself; SIGKILL whatever of the
        session is left after `timeout_s`; returns what was stopped."""
        state = self.state()
        if state is None:
            return None
        for pid in [state.supervisor_pid] if self.supervised(state) else _group(state.supervisor_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _group(state.supervisor_pid):
            time.sleep(0.1)
        for pid in _group(state.supervisor_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.state_file.unlink(missing_ok=True)
        (self.folder / REPORT_FILE).unlink(missing_ok=True)
        return state
