"""A model over 2 GB through the whole path, with the commands a user runs: build (evaluate, optimize with
INT8 and 4-bit candidates, sealed with a key), sign, verify, push, pull, serve with the key and the signature
required, one inference. Each stage runs as its own process; the table gives its wall time and peak RSS
(from wait4), against the size of the weights.

The model is a chain of 4096 x 4096 float32 MatMul layers (random weights), so `--gib 2.5` is 40 layers in
one side file past protobuf's 2 GB limit. `min_speedup: 0.99` keeps every candidate from replacing the FP32
model (each would have to be 100x faster), so what is signed, moved and served is the 2.5 GiB artifact; the
candidates still go through quantization, evaluation and timing on the big graph.

Run:  .venv/bin/python bench/big_model.py [--gib 2.5]   (needs about 6x the weights in free disk)
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import yaml
from _timing import matmul_chain

from shipyard.registry import LocalRegistry

WIDTH = 4096  # one layer: 64 MiB of float32
SHIPYARD = [sys.executable, "-m", "shipyard"]


# Each stage runs under this small parent: a process forked from the benchmark itself would count the
# benchmark's own memory in its peak RSS (Linux keeps the largest of the forked image and the new one).
MEASURED = """
import resource, signal, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
code = child.wait()
print(f"peak-rss-kib {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
sys.exit(code)
"""


def measured(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-c", MEASURED, *args], env=env, stdout=out, stderr=out)


def peak_mib(log: Path) -> float:
    line = next(x for x in reversed(log.read_text().splitlines()) if x.startswith("peak-rss-kib "))
    return int(line.split()[1]) / 1024


def stage(name: str, args: list[str], env: dict[str, str], rows: list[tuple[str, float, float, str]],
          log: Path) -> None:  # fmt: skip
    """Run one command to its end; record wall time and the peak RSS of its process."""
    start = time.monotonic()
    if measured(args, env, log).wait() != 0:
        raise SystemExit(f"{name} failed:\n{log.read_text()}")
    rows.append((name, time.monotonic() - start, peak_mib(log), ""))


def serve(registry: Path, public: Path, env: dict[str, str], rows: list[tuple[str, float, float, str]],
          log: Path) -> None:  # fmt: skip
    """Start the server, time it to ready, send one batch, stop it with SIGTERM."""
    start = time.monotonic()
    cmd = [*SHIPYARD, "serve", "big:1", "--registry", str(registry), "--http-port", "18761", "--grpc-port", "18762",
           "--metrics-port", "0", "--require-signed", "--public-key", str(public), "--max-body-mb", "8"]  # fmt: skip
    process = measured(cmd, env, log)
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited ({process.returncode}):\n{log.read_text()}")
        try:
            if httpx.get("http://127.0.0.1:18761/v2/health/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    ready = time.monotonic() - start
    x = np.random.default_rng(2).standard_normal((4, WIDTH)).astype(np.float32)
    body = {"inputs": [{"name": "x", "shape": [4, WIDTH], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    t0 = time.monotonic()
    reply = httpx.post("http://127.0.0.1:18761/v2/models/big/infer", json=body, timeout=120)
    infer_ms = (time.monotonic() - t0) * 1e3
    reply.raise_for_status()
    shape = reply.json()["outputs"][0]["shape"]
    process.send_signal(signal.SIGTERM)
    code = process.wait()
    note = f"ready in {ready:.1f} s; a batch of 4 in {infer_ms:.0f} ms -> {shape}; exit {code}"
    rows.append(("serve (signed + sealed)", time.monotonic() - start, peak_mib(log), note))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=2.5)
    args = parser.parse_args()
    layers = max(1, round(args.gib * 16))
    rows: list[tuple[str, float, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="big-model-") as scratch:
        root = Path(scratch)
        project = root / "project"
        project.mkdir()
        start = time.monotonic()
        matmul_chain(project / "big.onnx", layers, WIDTH)
        weights = (project / "big.onnx.data").stat().st_size
        rows.append(("write the ONNX model", time.monotonic() - start, 0.0, f"{weights / 2**30:.2f} GiB side file"))
        x = np.random.default_rng(1).standard_normal((64, WIDTH)).astype(np.float32)
        fp32 = ort.InferenceSession(str(project / "big.onnx"), providers=["CPUExecutionProvider"])
        np.savez(project / "eval.npz", x=x, y=fp32.run(None, {"x": x})[0].argmax(1))
        del fp32
        spec = {"version": 1, "name": "big", "model": {"format": "onnx", "path": "big.onnx"},
                "evaluation": {"dataset": {"kind": "npz", "path": "eval.npz"}, "metric": "accuracy",
                               "latency": {"iterations": 10, "throughput_batch": 4}},
                "optimize": {"steps": [{"step": "quantize_dynamic"}, {"step": "weight_only"}], "max_drop": 1.0,
                             "min_speedup": 0.99}}  # fmt: skip
        (project / "shipyard.yaml").write_text(yaml.safe_dump(spec))
        registry, pulled, keys = root / "registry", root / "pulled", root / "keys"
        key = base64.b64encode(os.urandom(32)).decode()
        env = {**os.environ, "SHIPYARD_ENCRYPTION_KEY": key}
        log = root / "stages.log"

        def run(name: str, *args: str) -> None:
            stage(name, [*SHIPYARD, *args], env, rows, log)

        run("build (evaluate, optimize, seal)", "build", str(project), "-r", str(registry))
        manifest = LocalRegistry(registry).manifest("big:1")
        candidates = next(s.params["candidates"] for s in manifest.lineage if s.step == "optimize")
        rows[-1] = (*rows[-1][:3], "; ".join(f"{c['step']}: {c['reason']}" for c in candidates))
        private, public = keys / "signing.pem", keys / "signing.pub.pem"
        run("keygen", "keygen", "--private", str(private), "--public", str(public))
        run("sign", "sign", "big:1", "--key", str(private), "-r", str(registry))
        run("verify", "verify", "big:1", "--public-key", str(public), "-r", str(registry))
        remote = f"file://{root / 'remote'}/"
        run("push (archive + .sha256)", "push", "big:1", remote, "-r", str(registry))
        archive = next(p for p in (root / "remote").iterdir() if not p.name.endswith(".sha256"))
        run("pull (checked)", "pull", f"{remote}{archive.name}", "-r", str(pulled))
        serve(pulled, public, env, rows, root / "serve.log")
        folder = LocalRegistry(pulled).path(LocalRegistry(pulled).resolve("big:1"))
        sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    print(f"weights: {weights / 2**20:,.0f} MiB in one side file; artifact files: "
          + ", ".join(f"{n} {s / 2**20:,.1f} MiB" for n, s in sorted(sizes.items())))  # fmt: skip
    print("| stage | wall s | peak RSS MiB | / weights | notes |")
    print("|---|---:|---:|---:|---|")
    for name, seconds, rss, note in rows:
        ratio = f"{rss * 2**20 / weights:.2f}x" if rss else ""
        print(f"| {name} | {seconds:.1f} | {f'{rss:,.0f}' if rss else ''} | {ratio} | {note} |")


if __name__ == "__main__":
    main()
