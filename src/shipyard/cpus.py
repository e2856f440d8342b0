"""How many CPUs this process may use: its affinity mask, capped by the cgroup's CPU quota (a container's
`resources.limits.cpu`), so `--workers auto` and thread counts fit what the scheduler will actually give."""

from __future__ import annotations

import os
from pathlib import Path

_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"


def usable() -> int:
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = _CPU_MAX.read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return count
