"""Where a language model's cold start goes: `shipyard serve` to ready, end to end, and the same loading
steps timed one by one in process (what `ModelRepository._open` does for a language model).

Run:  .venv/bin/python bench/cold_start.py REGISTRY NAME[:VERSION] [--runs 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import httpx


def served(registry: Path, ref: str, port: int) -> float:
    """Seconds from starting `shipyard serve` to its first 200 on /v2/health/ready (polled every 20 ms)."""
    cmd = [sys.executable, "-m", "shipyard", "serve", ref, "--registry", str(registry), "--http-port", str(port),
           "--grpc-port", str(port + 1), "--metrics-port", "0"]  # fmt: skip
    start = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"shipyard serve exited with {server.returncode}")
            time.sleep(0.02)
    finally:
        server.terminate()
        server.wait(30)


def phases(registry: Path, ref: str) -> list[tuple[str, float]]:
    """The loading steps in process, each timed (run in a fresh interpreter, so imports count)."""
    code = f"""
import asyncio, time
t0 = time.perf_counter()
import shipyard.serve.app, shipyard.serve.server
t1 = time.perf_counter()
from pathlib import Path
from shipyard.registry import LocalRegistry
from shipyard.registry.refs import parse_ref
from shipyard.serve.core.decoder import Decoder
from shipyard.serve.core.repository import serve_settings
from shipyard.serve.core.runtime import OrtRuntime
registry = LocalRegistry(Path({str(registry)!r}))
record = registry.resolve(parse_ref({ref!r}))
folder, manifest = registry.path(record), registry.manifest(record)
t2 = time.perf_counter()
runtime = OrtRuntime(folder, manifest, serve_settings(manifest), None, 1, None)
asyncio.run(runtime.load())
t3 = time.perf_counter()
decoder = Decoder(folder, manifest)
t4 = time.perf_counter()
decoder.attach(runtime.exclusive_session())
t5 = time.perf_counter()
decoder.detach()
print(t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    values = [float(v) for v in done.stdout.split()]
    names = ["imports (shipyard.serve)", "registry: resolve, manifest", "ONNX Runtime session",
             "decoder: tokenizer, chat template, grammar tables",
             "warm-up: a prefill, two decode steps of every slot"]  # fmt: skip
    return list(zip(names, values, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("registry", type=Path)
    parser.add_argument("ref")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port", type=int, default=18431)
    args = parser.parse_args()
    ends = [served(args.registry, args.ref, args.port) for _ in range(args.runs)]
    print(f"`shipyard serve {args.ref}` to ready: " + ", ".join(f"{s:.2f} s" for s in ends))
    print("| phase (in process) | ms |\n|---|---:|")
    for name, seconds in phases(args.registry, args.ref):
        print(f"| {name} | {seconds * 1000:.0f} |")


if __name__ == "__main__":
    main()
