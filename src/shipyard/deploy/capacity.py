"""Capacity planning from curves measured on this machine: replicas, CPU, memory and batching for a target.

The model is timed in process (ONNX Runtime, one intra-op thread per session, as the server runs it)
at each batch size, alone and with one session per core running at once. Under load a request waits
for at most one batch ahead of it and then its own batch, so a batch size is usable when twice its p99
fits the latency target. Replicas are sized so that the target QPS uses `utilization` of what they can
do: the rest is headroom for the transport (HTTP/gRPC decoding costs CPU too) and for bursts.
"""

from __future__ import annotations

import base64
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shipyard import memory
from shipyard.artifact.encryption import ModelSource, model_source
from shipyard.deploy.bundle import gpus
from shipyard.errors import ConflictError, InvalidInputError
from shipyard.onnxrt import is_batchable, random_feeds, session
from shipyard.registry.local import LocalRegistry
from shipyard.serve.core.repository import serve_settings
from shipyard.spec.loader import LoadedSpec
from shipyard.spec.models import MachineSpec, ResourcesSpec, SignatureSpec, quantity

_MI = 1 << 20


@dataclass(frozen=True)
class Point:
    """One measured point: batch size and concurrent sessions (each on its own thread)."""

    batch: int
    concurrency: int
    p50_ms: float
    p99_ms: float
    samples_per_s: float


@dataclass(frozen=True)
class CapacityPlan:
    model: str
    qps: float
    p99_target_ms: float
    utilization: float
    curve: list[Point]
    batch: int  # the batch size the plan runs at (max_batch_size)
    max_queue_delay_ms: float
    per_replica_qps: float
    replicas: int
    cpu: str
    memory: str
    peak_rss_mib: float
    estimate_mib: float  # what the server checks against its memory limit before it loads the version
    expected_p99_ms: float
    headroom: float  # spare capacity at the recommended replicas: 0.5 = 50 % more QPS than asked
    inputs: dict[str, list[int | str]]  # the input shapes timed: "batch" for the batch dimension

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _time(
    signature: SignatureSpec, model: ModelSource, batch: int, concurrency: int, seconds: float, sequence: int,
    providers: list[str],
) -> Point:  # fmt: skip
    sessions = [session(model.model, preferred=providers, side_files=model.side_files) for _ in range(concurrency)]
    feeds = random_feeds(signature, batch, other_dims=sequence)
    for sess in sessions:
        sess.run(None, feeds)

    def loop(index: int) -> list[float]:
        times: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            sessions[index].run(None, feeds)
            times.append(time.perf_counter() - start)
        return times

    with ThreadPoolExecutor(concurrency) as pool:  # ORT releases the GIL while it computes
        runs = list(pool.map(loop, range(concurrency)))
    every = [t for r in runs for t in r]
    rate = sum(batch * len(r) / sum(r) for r in runs)
    return Point(batch, concurrency, statistics.median(every) * 1e3, float(np.percentile(every, 99)) * 1e3, rate)


def peak_rss_mib(
    folder: Path, signature: SignatureSpec, batch: int, key: bytes | None = None, sequence: int = 8
) -> float:
    """Peak memory of a fresh process that imports the server, loads the version's model and runs the batch
    (an encrypted model is opened with `key`, handed to the process on its standard input)."""
    sample = random_feeds(signature, batch, other_dims=sequence)
    feeds = {k: v.tolist() for k, v in sample.items()}
    dtypes = {k: str(v.dtype) for k, v in sample.items()}
    script = (
        "import base64, json, resource, sys, numpy as np\n"
        "import shipyard.serve.app\n"
        "from pathlib import Path\n"
        "from shipyard.artifact.encryption import ModelSource, model_source\n"
        "from shipyard.artifact.layout import read_manifest\n"
        "from shipyard.onnxrt import session\n"
        "args = json.loads(sys.stdin.read())\n"
        "folder = Path(args['folder'])\n"
        "key = base64.b64decode(args['key']) if args['key'] else None\n"
        "source = model_source(folder, read_manifest(folder), key)\n"
        "s = session(source.model, side_files=source.side_files)\n"
        "s.run(None, {k: np.asarray(v, dtype=args['dtypes'][k]) for k, v in args['feeds'].items()})\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    key_text = base64.b64encode(key).decode() if key else None
    args = json.dumps({"folder": str(folder), "feeds": feeds, "dtypes": dtypes, "key": key_text})
    done = subprocess.run([sys.executable, "-c", script], input=args, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def _quantity_mib(mib: float) -> str:
    return f"{int(math.ceil(mib / 64) * 64)}Mi"


def plan_capacity(
    registry: LocalRegistry,
    ref: str,
    qps: float,
    p99_ms: float,
    utilization: float = 0.5,
    max_batch: int = 64,
    seconds: float = 0.5,
    encryption_key: bytes | None = None,
    sequence: int | None = None,
) -> CapacityPlan:
    """Measure the model's curves here and size a deployment for `qps` within `p99_ms`.

    Dynamic dimensions other than the batch are timed at `sequence`; by default a text model's tokenizer
    max_length (the longest a served batch is padded to), else 8.
    """
    if qps <= 0 or p99_ms <= 0:
        raise InvalidInputError("--qps and --p99 must be positive")
    if not 0 < utilization <= 1:
        raise InvalidInputError("--utilization must be in (0, 1]")
    record = registry.resolve(ref)
    manifest = registry.manifest(record, verify=True)
    if manifest.generation is not None:
        raise InvalidInputError(f"{record.ref} is a language model: capacity plans models that answer in one pass, "
                                "and a generation runs one pass per token (not measured here yet)")  # fmt: skip
    folder = registry.path(record)
    model = model_source(folder, manifest, encryption_key)
    signature = manifest.signature
    if sequence is None:
        sequence = manifest.tokenizer.max_length if manifest.tokenizer is not None else 8
    if sequence < 1:
        raise InvalidInputError("--sequence must be at least 1")
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max_batch] if is_batchable(signature) else [1]
    cores = os.cpu_count() or 1
    providers = serve_settings(manifest).providers()  # timed where it will be served (the CPU if that is absent)
    curve = [_time(signature, model, b, c, seconds, sequence, providers) for b in batches for c in sorted({1, cores})]
    alone = [p for p in curve if p.concurrency == 1]
    usable = [p for p in alone if 2 * p.p99_ms <= p99_ms]
    if not usable:
        raise ConflictError(f"{record.ref}: p99 at batch 1 is {alone[0].p99_ms:.2f} ms here, so a {p99_ms:g} ms p99 "
                            "cannot be met (a request may wait for one batch ahead of it)")  # fmt: skip
    best = max(usable, key=lambda p: p.samples_per_s)
    replicas = max(1, math.ceil(qps / (best.samples_per_s * utilization)))
    peak = peak_rss_mib(folder, signature, best.batch, encryption_key, sequence)
    # The replica's limit must also pass the server's own check, or it would refuse to load the version.
    estimate = memory.estimate(folder, manifest, serve_settings(manifest).instances) / _MI
    timed = {t.name: [d if isinstance(d, int) else ("batch" if i == 0 and is_batchable(signature) else sequence)
                      for i, d in enumerate(t.shape)] for t in signature.inputs}  # fmt: skip
    return CapacityPlan(
        model=record.ref, qps=qps, p99_target_ms=p99_ms, utilization=utilization, curve=curve,
        batch=best.batch, max_queue_delay_ms=round(best.p50_ms, 3), per_replica_qps=best.samples_per_s,
        replicas=replicas, cpu="1", memory=_quantity_mib(max(peak * 1.5, estimate)), peak_rss_mib=round(peak, 1),
        estimate_mib=round(estimate, 1),
        expected_p99_ms=round(2 * best.p99_ms, 3), headroom=replicas * best.samples_per_s / qps - 1, inputs=timed,
    )  # fmt: skip


@dataclass(frozen=True)
class MachineFit:
    """How the plan's replicas land on the spec's machine type."""

    machine: str  # its type and what it offers
    per_machine: int  # replicas one machine holds (0: not even one)
    machines: int  # machines the plan's replicas need
    bound: str  # what limits per_machine: cpu, memory, gpus or gpu memory
    needs: str  # one replica's request of that resource, against the machine's


def machine_fit(result: CapacityPlan, loaded: LoadedSpec) -> MachineFit | None:
    """Replicas per machine of `deploy.machine` and machines needed for the plan (None without one). A
    replica asks for the spec's resources when it sets them (else the plan's) and its GPUs; on a GPU its
    estimate must also fit the memory of those GPUs."""
    deploy = loaded.spec.deploy
    machine = deploy.machine
    if machine is None:
        return None
    own = "resources" in deploy.model_fields_set
    cpu, mem = (deploy.resources.cpu, deploy.resources.memory) if own else (result.cpu, result.memory)
    per_gpu = gpus(loaded)
    asked = {"cpu": (cpu, machine.cpu), "memory": (mem, machine.memory)}
    if per_gpu:
        asked["gpus"] = (str(per_gpu), str(machine.gpus))
    counts = {name: math.floor(quantity(have) / quantity(need) + 1e-9) for name, (need, have) in asked.items()}
    if per_gpu and machine.gpu_memory is not None:
        on_gpus = per_gpu * quantity(machine.gpu_memory)
        asked["gpu memory"] = (f"{math.ceil(result.estimate_mib)}Mi", f"{per_gpu} x {machine.gpu_memory}")
        counts["gpu memory"] = counts["gpus"] if result.estimate_mib * _MI <= on_gpus else 0
    bound = min(counts, key=lambda name: counts[name])
    per_machine = counts[bound]
    return MachineFit(
        machine=_describe(machine), per_machine=per_machine,
        machines=math.ceil(result.replicas / per_machine) if per_machine else 0, bound=bound,
        needs=f"{asked[bound][0]} of {asked[bound][1]}",
    )  # fmt: skip


def _describe(machine: MachineSpec) -> str:
    gpu = f", {machine.gpus} GPU" + (f" of {machine.gpu_memory}" if machine.gpu_memory else "") if machine.gpus else ""
    return f"{machine.type or 'the machine type'} ({machine.cpu} CPU, {machine.memory}{gpu})"


def misfit(result: CapacityPlan, loaded: LoadedSpec) -> str | None:
    """Why the spec's own replica size cannot hold the model (its memory limit under the plan's), or None."""
    deploy = loaded.spec.deploy
    if "resources" not in deploy.model_fields_set:
        return None  # apply sizes the replicas from the plan
    limit = deploy.resources.memory_limit or deploy.resources.memory
    if quantity(limit) >= quantity(result.memory):
        return None
    return (
        f"{result.model} does not fit the spec's replicas: their memory limit is {limit}, the plan needs "
        f"{result.memory} (peak RSS measured {result.peak_rss_mib:.0f} MiB, with 50 % margin)"
    )


def plan_file(loaded: LoadedSpec) -> Path:
    """Where `shipyard capacity --spec` keeps the plan that `apply` sizes the deployment from."""
    return loaded.base_dir / ".shipyard" / "capacity" / f"{loaded.spec.name}.json"


def save_plan(result: CapacityPlan, loaded: LoadedSpec) -> Path:
    path = plan_file(loaded)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=2))
    return path


def sized(loaded: LoadedSpec) -> LoadedSpec:
    """The spec with a saved capacity plan's resources and replicas where the spec does not set its own."""
    try:
        saved = json.loads(plan_file(loaded).read_text())
    except FileNotFoundError:
        return loaded
    deploy = loaded.spec.deploy
    given = deploy.model_fields_set
    update: dict[str, object] = {}
    if "resources" not in given:
        update["resources"] = ResourcesSpec(cpu=saved["cpu"], memory=saved["memory"])
    if "min_replicas" not in given and "max_replicas" not in given:
        # The plan's count serves the target at the planned utilisation; allow twice that for bursts.
        update.update(min_replicas=saved["replicas"], max_replicas=2 * saved["replicas"])
    if not update:
        return loaded
    spec = loaded.spec.model_copy(update={"deploy": deploy.model_copy(update=update)})
    return LoadedSpec(spec=spec, path=loaded.path)
