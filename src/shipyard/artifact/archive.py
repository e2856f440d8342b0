"""Single-file transport archive (.tar.gz) of an artifact folder, with safe extraction."""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

from shipyard.artifact.layout import safe_relative
from shipyard.errors import IntegrityError

ARCHIVE_SUFFIX = ".shipyard.tar.gz"


def pack(folder: Path, dest: Path) -> Path:
    """Write `folder` as a reproducible tar.gz (sorted, zeroed owners and times) to `dest`."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    with (
        dest.open("wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in files:
            info = tar.gettarinfo(str(path), arcname=path.relative_to(folder).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o644
            with path.open("rb") as fh:
                tar.addfile(info, fh)
    return dest


def unpack(archive: Path, dest: Path, max_bytes: int = 64 << 30) -> None:
    """Extract regular files only; refuse links, devices, absolute or `..` paths and oversize content."""
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            members = tar.getmembers()
            total = 0
            for member in members:
                if not (member.isfile() or member.isdir()):
                    raise IntegrityError(f"{archive}: refusing archive entry {member.name!r} (not a regular file)")
                safe_relative(member.name)
                total += member.size
                if total > max_bytes:
                    raise IntegrityError(f"{archive}: archive expands beyond {max_bytes} bytes")
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError) as exc:
        raise IntegrityError(f"{archive}: not a readable Shipyard archive ({exc})") from None
