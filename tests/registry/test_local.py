from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shipyard.artifact import create_manifest
from shipyard.errors import ConflictError, IntegrityError, InvalidInputError, NotFoundError
from shipyard.registry import LocalRegistry, open_registry
from shipyard.settings import Environment
from tests._helpers import SIGNATURE, publish


def test_versions_are_numbered_per_model(registry: LocalRegistry) -> None:
    assert [publish(registry, "a"), publish(registry, "a"), publish(registry, "b")] == [1, 2, 1]
    assert registry.models() == ["a", "b"]
    assert registry.resolve("a").version == 2
    assert registry.resolve("a:1").version == 1
    assert registry.manifest("a:2", verify=True).version == 2
    assert not any((registry.root / ".staging").iterdir())


def test_aliases(registry: LocalRegistry) -> None:
    publish(registry)
    publish(registry)
    registry.set_alias("m:1", "production")
    registry.set_alias("m", "staging")
    assert registry.resolve("m@production").version == 1
    assert registry.resolve("m@staging").version == 2
    registry.set_alias("m:2", "production")  # moving an alias
    assert registry.resolve("m@production").version == 2
    assert registry.resolve("m:2").aliases == ("production", "staging")
    registry.remove_alias("m", "staging")
    with pytest.raises(NotFoundError, match="no alias 'staging'"):
        registry.resolve("m@staging")
    with pytest.raises(ConflictError, match="reserved"):
        registry.set_alias("m:1", "latest")


def test_remove_keeps_aliased_versions_unless_forced(registry: LocalRegistry) -> None:
    publish(registry)
    publish(registry)
    registry.set_alias("m:1", "production")
    with pytest.raises(ConflictError, match=r"m:1 \(production\)"):
        registry.remove("m")
    assert [r.version for r in registry.versions("m")] == [1, 2]  # nothing removed
    registry.remove("m:2")
    assert not (registry.root / "models" / "m" / "2").exists()
    registry.remove("m", force=True)
    with pytest.raises(NotFoundError):
        registry.versions("m")
    assert publish(registry) == 3  # numbers are never reused


def test_unknown_refs_and_bad_names(registry: LocalRegistry) -> None:
    publish(registry)
    with pytest.raises(NotFoundError, match="no model named 'x'"):
        registry.resolve("x")
    with pytest.raises(NotFoundError, match="no version 9"):
        registry.resolve("m:9")
    for bad in ("../m", "m:0", "m:one", "m@../x", "a/b"):
        with pytest.raises(InvalidInputError):
            registry.resolve(bad)


def test_corrupt_staged_artifact_is_not_published(registry: LocalRegistry) -> None:
    with registry.stage() as staged:
        (staged / "model.onnx").write_bytes(b"model")
        create_manifest(staged, name="m", model_file="model.onnx", signature=SIGNATURE)
        (staged / "model.onnx").write_bytes(b"changed after hashing")
        with pytest.raises(IntegrityError):
            registry.publish(staged)
    assert registry.all_versions() == []
    assert not (registry.root / "models" / "m" / "1").exists()


def test_orphan_folder_from_a_crash_is_invisible_and_replaced(registry: LocalRegistry) -> None:
    # A crash between moving the folder into place and committing the index leaves this state.
    orphan = registry.root / "models" / "m" / "1"
    orphan.mkdir(parents=True)
    (orphan / "model.onnx").write_bytes(b"half-written")
    assert registry.all_versions() == []
    assert publish(registry, payload=b"good") == 1
    assert (orphan / "model.onnx").read_bytes() == b"good"
    registry.manifest("m:1", verify=True)


def test_registry_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHIPYARD_REGISTRY", str(tmp_path / "env-reg"))
    assert Environment.from_environ().registry == str(tmp_path / "env-reg")  # read by the settings layer only
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert open_registry().root == (tmp_path / "home" / ".shipyard" / "registry").resolve()
    assert open_registry(tmp_path / "flag").root == (tmp_path / "flag").resolve()
    assert open_registry(f"file://{tmp_path}/uri").root == (tmp_path / "uri").resolve()
    with pytest.raises(InvalidInputError, match="local path"):
        open_registry("s3://bucket/reg")


_PUBLISHER = """
import sys
from pathlib import Path
from shipyard.artifact import create_manifest
from shipyard.registry import LocalRegistry
from shipyard.spec.models import SignatureSpec, TensorSpec

registry = LocalRegistry(Path(sys.argv[1]))
signature = SignatureSpec(inputs=[TensorSpec(name="x", dtype="float32", shape=["batch", 2])])
count = int(sys.argv[2])
i = 0
while count < 0 or i < count:
    with registry.stage() as staged:
        (staged / "model.onnx").write_bytes(sys.argv[3].encode() * 200_000 + str(i).encode())
        create_manifest(staged, name="m", model_file="model.onnx", signature=signature)
        print(registry.publish(staged).version, flush=True)
    i += 1
"""


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    LocalRegistry(root)
    procs = [
        subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(root), "3", f"p{n}"], stdout=subprocess.PIPE, text=True)
        for n in range(4)
    ]
    printed = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        printed += [int(v) for v in out.split()]
    assert sorted(printed) == list(range(1, 13))
    registry = LocalRegistry(root)
    assert [r.version for r in registry.versions("m")] == list(range(1, 13))
    for record in registry.versions("m"):
        registry.manifest(record, verify=True)


def test_kill_during_publishing_never_exposes_a_partial_version(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    LocalRegistry(root)
    rng = random.Random(7)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(root), "-1", "k"], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one version landed, so the kill hits a busy loop
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        registry = LocalRegistry(root)
        for record in registry.versions("m"):
            registry.manifest(record, verify=True)  # every visible version is whole
    before = registry.versions("m")[-1].version
    assert publish(registry, payload=b"after the crashes") == before + 1
