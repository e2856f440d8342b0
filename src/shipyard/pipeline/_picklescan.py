"""Scan a pickle the spec trusts before unpickling it: dangerous imports (os.system, eval, …) are refused.

picklescan reads the pickle opcodes without running them and classifies every global the file would
import. Trust in the spec means "I made this file"; the scan guards against a file swapped since.
"""

from __future__ import annotations

from pathlib import Path

from shipyard._extras import require
from shipyard.errors import UnsafeModelError


def refuse_dangerous_pickle(path: Path) -> None:
    """UnsafeModelError naming the dangerous globals if the scan finds any."""
    scanner = require("picklescan.scanner", "torch", "scanning trusted pickles")
    result = scanner.scan_file_path(str(path))
    dangerous = sorted({f"{g.module}.{g.name}" for g in result.globals if g.safety.name == "Dangerous"})
    if result.issues_count or dangerous:
        raise UnsafeModelError(
            f"{path}: refused even though the spec trusts pickles: it would import {', '.join(dangerous)} "
            "(found by picklescan without running it)"
        )
