"""How much memory a model version needs when served, and how much this machine (or container) has left.

The server checks before it loads a version, so a model that cannot fit is refused with a reason instead
of the process being killed by the kernel or the container runtime half-way through loading.

The estimate is deliberately simple and says what it counts: each session holds its own copy of the
weights (so `instances` copies), ONNX Runtime's working memory (activations, arenas, pre-packed kernels)
is taken as half the weights plus 128 MiB, a language model adds its preallocated key/value cache, and a
sealed model its decrypted copy held while the sessions are made. The working margin is set above what the
servers of bench/llm_bench.py showed (docs/benchmarks.md, 2026-12-02): the 88 M Llama in FP32 (336 MiB of
weights, a 192 MiB cache, 770 MiB resident, ~150 MiB of it the server itself: ~92 MiB of working memory)
and in INT8 (84 MiB, 192 MiB, 494 MiB: ~68 MiB). It is an estimate, not a bound.
"""

from __future__ import annotations

from pathlib import Path

from shipyard.artifact.manifest import Manifest
from shipyard.onnxrt import model_bytes

WORKING_SHARE, WORKING_FLOOR = 0.5, 128 << 20  # ONNX Runtime's working memory: half the weights + 128 MiB
_CGROUP = Path("/sys/fs/cgroup")


def weight_bytes(folder: Path, manifest: Manifest) -> int:
    """The model file and its weight file, as stored."""
    return model_bytes(folder / manifest.model_file)


def cache_bytes(manifest: Manifest) -> int:
    """A language model's key/value cache: every slot, every layer, keys and values, float32."""
    record = manifest.generation
    if record is None:
        return 0
    return record.max_running * record.context * record.layers * 2 * record.kv_heads * record.head_size * 4


def estimate(folder: Path, manifest: Manifest, instances: int) -> int:
    """Bytes a served version is expected to take once loaded."""
    weights = weight_bytes(folder, manifest)
    decrypted = weights if manifest.encryption is not None else 0
    working = int(weights * WORKING_SHARE) + WORKING_FLOOR
    return weights * instances + working + cache_bytes(manifest) + decrypted


def available() -> int | None:
    """Bytes this process may still allocate: the smaller of the cgroup's room (memory.max less
    memory.current, cgroup v2) and the machine's MemAvailable; None when neither can be read."""
    room: list[int] = []
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            room.append(int(limit) - int((_CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                room.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return min(room) if room else None


def mib(count: int) -> str:
    return f"{count / 2**20:,.0f} MiB"
