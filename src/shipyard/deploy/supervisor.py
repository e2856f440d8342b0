"""Run the local service's server and restart it when it dies; SIGTERM drains it and exits.

Usage: python -m shipyard.deploy.supervisor SERVICE_JSON LOG_FILE
It detaches (forks into a new session, prints its pid and returns), so the caller can exit or go on
without owning the supervisor; the supervisor and server write to LOG_FILE, and a `ready` file beside
it appears once the server it started reports itself ready (`server.json`, written by that process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import FrameType

from shipyard.settings import child_environment

MAX_BACKOFF_S = 30.0
REPORT_FILE = "server.json"  # beside the log: the running server's own readiness report


def server_ready(port: int) -> bool:
    """Whether the server on this loopback port answers its V2 readiness endpoint with 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def reported_by(report: Path, pid: int) -> bool:
    """Whether the server process `pid` itself wrote its readiness report (serve --report-file): a probe of
    the port alone could be answered by another process holding it."""
    try:
        return bool(json.loads(report.read_text()).get("pid") == pid)
    except (OSError, ValueError, AttributeError):
        return False


def supervise(service_file: Path, ready_file: Path) -> int:
    service = json.loads(service_file.read_text())
    env = child_environment(service["env"])
    report = ready_file.with_name(REPORT_FILE)
    argv = [*service["argv"], "--report-file", str(report)]
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)  # the server drains in-flight requests, then exits

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    backoff, ever_ready = 0.5, False
    while not stopping:
        started = time.monotonic()
        report.unlink(missing_ok=True)
        child = subprocess.Popen(argv, env=env)
        while True:
            try:
                code = child.wait(timeout=0.5 if ever_ready else 0.1)
                break
            except subprocess.TimeoutExpired:
                if not ever_ready and reported_by(report, child.pid):
                    ever_ready = True
                    ready_file.touch()  # from here on a dying server is restarted; the starter waits for this
        if stopping:
            return 0
        if not ever_ready:
            return code  # it never came up (bad model, port taken): restarting cannot help
        # A server that ran a while before dying is restarted at once; one that keeps failing backs off.
        backoff = 0.5 if time.monotonic() - started > 60 else min(backoff * 2, MAX_BACKOFF_S)
        print(f"shipyard supervisor: server exited with {code}; restarting in {backoff:.1f}s", flush=True)
        time.sleep(backoff)
    return 0


def detach(service_file: Path, log_file: Path) -> None:
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        return
    os.setsid()
    with log_file.open("ab") as log, open(os.devnull, "rb") as null:
        os.dup2(null.fileno(), 0)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    os._exit(supervise(service_file, log_file.with_name("ready")))


if __name__ == "__main__":
    detach(Path(sys.argv[1]), Path(sys.argv[2]))
