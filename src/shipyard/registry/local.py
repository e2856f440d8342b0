"""The embedded registry: a folder of immutable versions plus a SQLite index.

The index is the source of truth for what exists. A version folder is moved into place and its
index row inserted inside one write transaction, so a crash or failure at any point leaves either
a whole version or nothing visible; a folder without its row (a crash between the two) is an
orphan that the next publish of that number removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shipyard.artifact.layout import read_manifest, verify_artifact, write_manifest
from shipyard.artifact.manifest import Manifest, utc_now
from shipyard.errors import ConflictError, NotFoundError, UnavailableError
from shipyard.registry.refs import ModelRef, check_name, parse_ref

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, version INTEGER NOT NULL, content_hash TEXT NOT NULL,
    created_at TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, last_version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (name, alias));
CREATE TABLE IF NOT EXISTS alias_history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL,
    at TEXT NOT NULL);
"""


@dataclass(frozen=True)
class VersionRecord:
    """One registered version as the index knows it."""

    name: str
    version: int
    content_hash: str
    created_at: str
    size: int
    aliases: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


def _fsync_tree(folder: Path) -> None:
    # Flush file contents and the folder entries so a power loss after commit cannot expose
    # a version whose bytes never reached the disk.
    for path in sorted(folder.rglob("*"), reverse=True):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalRegistry:
    """Versions, aliases and atomic publishing in a local folder."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self._models = self.root / "models"
        self._staging = self.root / ".staging"
        self.read_only = False  # on a read-only volume (a Kubernetes volume, a baked image): read, never written
        try:
            self._models.mkdir(parents=True, exist_ok=True)
            self._staging.mkdir(exist_ok=True)
            with self._connect() as db:
                db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            if not ((self.root / "index.sqlite").is_file() and not os.access(self.root, os.W_OK)):
                raise UnavailableError(f"cannot open registry at {self.root}: {exc}") from None
            self.read_only = True

    def __repr__(self) -> str:
        return f"LocalRegistry({str(self.root)!r})"

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if self.read_only:  # immutable: SQLite makes no -wal or -shm file beside it (it could not)
            uri = f"{(self.root / 'index.sqlite').as_uri()}?mode=ro&immutable=1"
            db = sqlite3.connect(uri, uri=True, isolation_level=None)
        else:
            db = sqlite3.connect(self.root / "index.sqlite", timeout=60, isolation_level=None)
        try:
            if not self.read_only:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
            yield db
        finally:
            db.close()

    def _writable(self) -> None:
        if self.read_only:
            raise UnavailableError(f"the registry at {self.root} is on a read-only volume: it can be listed, "
                                   "verified and served, not changed")  # fmt: skip

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One serialized write transaction across processes (BEGIN IMMEDIATE takes the write lock)."""
        self._writable()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # --- writing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def stage(self) -> Iterator[Path]:
        """A private folder on the registry's filesystem to assemble an artifact in; removed on exit."""
        self._writable()
        folder = self._staging / uuid.uuid4().hex
        folder.mkdir()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def publish(self, staged: Path, *, keep_version: bool = False) -> Manifest:
        """Verify a staged artifact and make it the model's next version, atomically; with `keep_version`, the
        version number its manifest carries (a pulled or restored version keeps the number it had).

        Returns the manifest with its version; raises IntegrityError if the staged files do not
        match their manifest, ConflictError if a kept number already holds other content; when it holds this
        very content, that version is returned. The staged folder is consumed.
        """
        manifest = verify_artifact(staged)
        check_name(manifest.name)
        model_dir = self._models / manifest.name
        model_dir.mkdir(exist_ok=True)
        with self._write() as db:
            row = db.execute("SELECT last_version FROM counters WHERE name = ?", (manifest.name,)).fetchone()
            last = row[0] if row else 0
            if keep_version and manifest.version is not None:
                version = manifest.version
                held = db.execute("SELECT content_hash FROM versions WHERE name = ? AND version = ?",
                                  (manifest.name, version)).fetchone()  # fmt: skip
                if held is not None and held[0] == manifest.content_hash:  # pulled again (a restarted container)
                    return read_manifest(model_dir / str(version))
                if held is not None:
                    raise ConflictError(
                        f"{manifest.name}:{version} already holds other content ({held[0][:19]}…, not "
                        f"{manifest.content_hash[:19]}…): remove it first, or use another registry"
                    )
            else:
                version = last + 1
            manifest = manifest.model_copy(update={"version": version})
            write_manifest(staged, manifest)
            _fsync_tree(staged)
            target = model_dir / str(version)
            if target.exists():  # an orphan left by a crash before an earlier commit
                shutil.rmtree(target)
            os.rename(staged, target)
            try:
                db.execute(
                    "INSERT INTO versions VALUES (?, ?, ?, ?, ?)",
                    (manifest.name, version, manifest.content_hash, manifest.created_at, manifest.size_bytes),
                )
                db.execute("INSERT OR REPLACE INTO counters VALUES (?, ?)", (manifest.name, max(last, version)))
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
        return manifest

    def set_alias(self, ref: str | ModelRef, alias: str) -> VersionRecord:
        """Point `alias` of the model at the version `ref` resolves to."""
        check_name(alias, what="alias")
        if alias.isdigit() or alias == "latest":
            raise ConflictError(f"alias {alias!r} is reserved (numbers and 'latest' name versions)")
        record = self.resolve(ref)
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO aliases VALUES (?, ?, ?)", (record.name, alias, record.version))
            db.execute("INSERT INTO alias_history (name, alias, version, at) VALUES (?, ?, ?, ?)",
                       (record.name, alias, record.version, utc_now()))  # fmt: skip
        return self.resolve(ModelRef(record.name, version=record.version))

    def alias_history(self, name: str, alias: str) -> list[tuple[int, str]]:
        """(version, when) each time the alias was pointed somewhere, oldest first."""
        with self._connect() as db:
            rows = db.execute("SELECT version, at FROM alias_history WHERE name = ? AND alias = ? ORDER BY seq",
                              (name, alias)).fetchall()  # fmt: skip
        return [(int(v), str(at)) for v, at in rows]

    def roll_back_alias(self, name: str, alias: str) -> VersionRecord:
        """Point the alias at the version it named before the current one (that still exists)."""
        current = self.resolve(ModelRef(name, alias=alias))
        existing = {r.version for r in self.versions(name)}
        earlier = [v for v, _ in self.alias_history(name, alias) if v != current.version and v in existing]
        if not earlier:
            raise ConflictError(f"{name}@{alias} has no earlier version to roll back to (it is {current.ref})")
        return self.set_alias(ModelRef(name, version=earlier[-1]), alias)

    def remove_alias(self, name: str, alias: str) -> None:
        with self._write() as db:
            if db.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias)).rowcount == 0:
                raise NotFoundError(f"model {name!r} has no alias {alias!r}")

    def remove(self, ref: str | ModelRef, *, force: bool = False) -> list[VersionRecord]:
        """Delete one version (`name:version`) or every version of a model (`name`).

        Aliased versions are kept unless `force`; the index rows go first, so a crash mid-delete
        leaves at worst an invisible folder.
        """
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        targets = [self.resolve(parsed)] if parsed.version or parsed.alias else self.versions(parsed.name)
        aliased = [f"{t.ref} ({', '.join(t.aliases)})" for t in targets if t.aliases]
        if aliased and not force:
            raise ConflictError(f"aliased versions are kept: {'; '.join(aliased)}; remove the aliases or use --force")
        with self._write() as db:
            for t in targets:
                db.execute("DELETE FROM versions WHERE name = ? AND version = ?", (t.name, t.version))
                db.execute("DELETE FROM aliases WHERE name = ? AND version = ?", (t.name, t.version))
        for t in targets:
            shutil.rmtree(self._models / t.name / str(t.version), ignore_errors=True)
        return targets

    # --- reading -----------------------------------------------------------------------------

    def _records(self, where: str, args: tuple[object, ...]) -> list[VersionRecord]:
        with self._connect() as db:
            rows = db.execute(
                f"SELECT name, version, content_hash, created_at, size FROM versions {where} ORDER BY name, version",
                args,
            ).fetchall()
            aliases: dict[tuple[str, int], list[str]] = {}
            for name, alias, version in db.execute("SELECT name, alias, version FROM aliases ORDER BY alias"):
                aliases.setdefault((name, version), []).append(alias)
        return [
            VersionRecord(name, version, digest, created, size, tuple(aliases.get((name, version), ())))
            for name, version, digest, created, size in rows
        ]

    def models(self) -> list[str]:
        with self._connect() as db:
            return [r[0] for r in db.execute("SELECT DISTINCT name FROM versions ORDER BY name")]

    def versions(self, name: str) -> list[VersionRecord]:
        records = self._records("WHERE name = ?", (name,))
        if not records:
            raise NotFoundError(f"no model named {name!r} in {self.root}")
        return records

    def all_versions(self) -> list[VersionRecord]:
        return self._records("", ())

    def resolve(self, ref: str | ModelRef) -> VersionRecord:
        """The version a reference names: `name` (latest), `name:3`, or `name@alias`."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        records = self.versions(parsed.name)
        if parsed.alias is not None:
            found = [r for r in records if parsed.alias in r.aliases]
            if not found:
                raise NotFoundError(f"model {parsed.name!r} has no alias {parsed.alias!r}")
            return found[0]
        if parsed.version is not None:
            found = [r for r in records if r.version == parsed.version]
            if not found:
                raise NotFoundError(f"model {parsed.name!r} has no version {parsed.version}")
            return found[0]
        return records[-1]

    def path(self, ref: str | ModelRef | VersionRecord) -> Path:
        record = ref if isinstance(ref, VersionRecord) else self.resolve(ref)
        return self._models / record.name / str(record.version)

    def manifest(self, ref: str | ModelRef | VersionRecord, *, verify: bool = False) -> Manifest:
        """The version's manifest; with `verify`, every file is re-hashed first."""
        folder = self.path(ref)
        return verify_artifact(folder) if verify else read_manifest(folder)
