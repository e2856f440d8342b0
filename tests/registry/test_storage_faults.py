"""Storage faults on real filesystems: a full disk during a build, and a registry on a read-only volume (how
Kubernetes volumes and baked images are served). Each runs in a private mount namespace (`unshare -m`), so
its mounts vanish with it; where that is not allowed (not root), the tests are skipped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shipyard.pipeline import import_onnx
from shipyard.registry import LocalRegistry
from tests._helpers import free_port, make_mlp_onnx

SHIPYARD = [sys.executable, "-m", "shipyard"]


def _namespace(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`script` (sh) in a mount namespace of its own; $SHIPYARD names the command, $PYTHON the interpreter."""
    env = {**os.environ, "SHIPYARD": " ".join(SHIPYARD), "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(sys.path), **env}  # fmt: skip
    return subprocess.run(["unshare", "-m", "sh", "-ec", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)  # fmt: skip


@pytest.fixture(autouse=True)
def _mounts_allowed(tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    probe = _namespace("mkdir -p a && mount -t tmpfs -o size=1m tmpfs a", tmp_path)
    if probe.returncode != 0:
        pytest.skip(f"mounts are not allowed here: {probe.stderr.strip()}")


def test_a_full_disk_during_import_is_a_storage_error_and_registers_nothing(tmp_path: Path) -> None:
    make_mlp_onnx(tmp_path / "big.onnx", sizes=(16, 1024, 512, 4))  # 2.1 MB of weights on a 1 MB disk
    run = _namespace(
        "mkdir -p small && mount -t tmpfs -o size=1m tmpfs small\n"
        'set +e; $SHIPYARD import big.onnx --name big -r small/registry; echo "exit=$?"; set -e\n'
        "$SHIPYARD models list -r small/registry --json",
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "exit=9" in run.stdout
    assert "error: storage: No space left on device" in run.stderr
    assert "internal error" not in run.stderr
    assert json.loads(run.stdout.split("exit=9", 1)[1]) == []  # the registry stayed consistent: nothing half-made


def test_a_registry_on_a_read_only_volume_is_listed_verified_and_served(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "reg")
    import_onnx(make_mlp_onnx(tmp_path / "mlp.onnx"), "mlp", registry)
    port = free_port()
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]})
    client = (
        "import httpx, time, sys\n"
        "for _ in range(300):\n"
        "    try:\n"
        f"        if httpx.get('http://127.0.0.1:{port}/v2/health/ready').status_code == 200: break\n"
        "    except httpx.HTTPError: pass\n"
        "    time.sleep(0.1)\n"
        f"reply = httpx.post('http://127.0.0.1:{port}/v2/models/mlp/infer', content=sys.argv[1])\n"
        "print('infer', reply.status_code)\n"
    )
    run = _namespace(
        "mount --bind reg reg && mount -o remount,bind,ro reg\n"
        "if touch reg/x 2>/dev/null; then exit 3; fi\n"  # really read-only
        "$SHIPYARD models list -r reg --json\n"
        "$SHIPYARD models show mlp:1 --verify -r reg > /dev/null\n"
        "set +e; $SHIPYARD import mlp.onnx --name other -r reg; echo \"import=$?\"; set -e\n"
        f"$SHIPYARD serve mlp -r reg --http-port {port} --grpc-port 0 --metrics-port 0 2> serve.log &\n"
        "server=$!; trap 'kill -TERM $server 2>/dev/null; wait $server' EXIT\n"  # stopped however this ends
        "$PYTHON -c \"$CLIENT\" \"$BODY\"\n",
        tmp_path, CLIENT=client, BODY=body,
    )  # fmt: skip
    log = tmp_path / "serve.log"
    assert run.returncode == 0, run.stderr + (log.read_text() if log.exists() else "")
    listed = json.loads(run.stdout.split("import=")[0])
    assert [(r["name"], r["version"]) for r in listed] == [("mlp", 1)]
    assert "verified 1 file(s) against their sha256" in run.stderr
    assert "import=9" in run.stdout
    assert "is on a read-only volume: it can be listed, verified and served, not changed" in run.stderr
    assert "infer 200" in run.stdout
    assert not list((tmp_path / "reg").glob("index.sqlite-*"))  # SQLite wrote nothing beside it
