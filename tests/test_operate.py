"""Operations through the CLI: promote and roll back aliases, gc, validate, backup and restore."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shipyard.registry import LocalRegistry
from tests._helpers import build_evaluated_mlp, publish

Cli = Callable[..., Any]


def _reg(registry: LocalRegistry) -> tuple[str, str]:
    return "--registry", str(registry.root)


def test_promote_and_roll_back_an_alias(registry: LocalRegistry, cli: Cli) -> None:
    for payload in (b"one", b"two", b"three"):
        publish(registry, "m", payload)
    assert cli("promote", "m:1", *_reg(registry)).code == 0
    assert cli("promote", "m:3", *_reg(registry)).code == 0
    assert registry.resolve("m@production").version == 3
    back = cli("rollback", "m@production", *_reg(registry))
    assert back.code == 0, back.err
    assert registry.resolve("m@production").version == 1
    assert [v for v, _ in registry.alias_history("m", "production")] == [1, 3, 1]
    fresh = cli("rollback", "m@staging", *_reg(registry))
    assert fresh.code == 3  # no such alias: not found
    publish(registry, "n", b"only")
    cli("promote", "n:1", *_reg(registry))
    lonely = cli("rollback", "n@production", *_reg(registry))
    assert lonely.code == 4
    assert "no earlier version" in lonely.err


def test_gc_keeps_aliased_and_newest_versions_and_clears_stale_staging(registry: LocalRegistry, cli: Cli) -> None:
    for i in range(5):
        publish(registry, "m", f"v{i}".encode())
    registry.set_alias("m:1", "production")
    stale = registry.root / ".staging" / "crashed-build"
    stale.mkdir(parents=True)
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh = registry.root / ".staging" / "building-now"
    fresh.mkdir()
    dry = cli("gc", "--keep", "2", "--dry-run", *_reg(registry))
    assert dry.code == 0
    assert [r.version for r in registry.versions("m")] == [1, 2, 3, 4, 5]
    assert "would remove m:2" in dry.out
    assert cli("gc", "--keep", "2", *_reg(registry)).code == 0
    assert [r.version for r in registry.versions("m")] == [1, 4, 5]
    assert not stale.exists()
    assert fresh.exists()  # possibly a build in progress: left alone


def test_validate_passes_then_fails_when_the_evaluation_data_drifts(
    registry: LocalRegistry, tmp_path: Path, cli: Cli
) -> None:
    x, labels = build_evaluated_mlp(tmp_path, registry, samples=300)
    registry.set_alias("mlp:1", "production")
    ok = cli("validate", "mlp@production", "--base-dir", str(tmp_path), *_reg(registry))
    assert ok.code == 0, ok.err
    assert "accuracy 1.0000" in ok.out
    np.savez(tmp_path / "eval.npz", x=x, y=(labels + 1) % 4)  # the world changed: every label is now different
    failed = cli("validate", "mlp@production", "--base-dir", str(tmp_path), *_reg(registry))
    assert failed.code == 6
    assert "exceeds the budget" in failed.err


def test_backup_and_restore_keep_versions_and_aliases(registry: LocalRegistry, tmp_path: Path, cli: Cli) -> None:
    publish(registry, "a", b"a1")
    publish(registry, "a", b"a2")
    publish(registry, "a", b"a3")
    publish(registry, "b", b"b1")
    registry.remove("a:1")  # numbers are kept: the restored registry has a:2 and a:3, not a:1 and a:2
    registry.set_alias("a:2", "production")
    uri = f"file://{tmp_path / 'backup'}/"
    assert cli("backup", uri, *_reg(registry)).code == 0
    restored = LocalRegistry(tmp_path / "restored")
    result = cli("restore", uri, "--registry", str(restored.root))
    assert result.code == 0, result.err
    original = {(r.name, r.version, r.content_hash, r.aliases) for r in registry.all_versions()}
    assert {(r.name, r.version, r.content_hash, r.aliases) for r in restored.all_versions()} == original
    assert {r.ref for r in restored.all_versions()} == {"a:2", "a:3", "b:1"}
    missing = cli("restore", f"file://{tmp_path / 'nothing'}/", "--registry", str(restored.root))
    assert missing.code == 3
