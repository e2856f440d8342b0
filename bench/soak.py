"""Soak: saturating load on `shipyard serve` for minutes, every answer checked, memory watched.

Run:  .venv/bin/python bench/soak.py [--seconds 180] [--clients 8]

The reference MLP (784-512-512-10) is served on loopback; half the clients use HTTP with binary
tensors and half gRPC, each sending random batch-1..8 requests and comparing every answer with
in-process ONNX Runtime. Prints requests, errors, wrong answers, throughput and server RSS over time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from reference import write_reference_mlp  # noqa: E402
from serve_bench import free_port, start_server  # noqa: E402


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok = self.errors = self.wrong = 0


def client_loop(kind: str, url: str, model: Path, stop: threading.Event, counters: Counters, seed: int) -> None:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    module = httpclient if kind == "http" else grpcclient
    client = module.InferenceServerClient(url)
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        x = rng.standard_normal((int(rng.integers(1, 9)), 784)).astype(np.float32)
        inp = module.InferInput("input", list(x.shape), "FP32")
        if kind == "http":
            inp.set_data_from_numpy(x, binary_data=True)
        else:
            inp.set_data_from_numpy(x)
        try:
            got = client.infer("mlp", [inp]).as_numpy("logits")
        except Exception:
            with counters.lock:
                counters.errors += 1
            continue
        good = got is not None and np.allclose(got, session.run(None, {"input": x})[0], rtol=1e-4, atol=1e-5)
        with counters.lock:
            counters.ok += int(good)
            counters.wrong += int(not good)


def rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = write_reference_mlp(work / "mlp.onnx")
        registry = work / "registry"
        subprocess.run([sys.executable, "-m", "shipyard", "import", str(model), "--name", "mlp", "--registry",
                        str(registry)], check=True, capture_output=True)  # fmt: skip
        http, grpc_port = free_port(), free_port()
        server = start_server(registry, http, grpc_port)
        counters, stop = Counters(), threading.Event()
        threads = [
            threading.Thread(target=client_loop, args=("http" if i % 2 == 0 else "grpc",
                             f"127.0.0.1:{http if i % 2 == 0 else grpc_port}", model, stop, counters, i))
            for i in range(args.clients)
        ]  # fmt: skip
        try:
            for thread in threads:
                thread.start()
            start, samples = time.monotonic(), []
            while time.monotonic() - start < args.seconds:
                time.sleep(min(15.0, args.seconds / 8))
                samples.append((time.monotonic() - start, counters.ok, rss_mib(server.pid)))
                print(f"{samples[-1][0]:6.0f} s  {samples[-1][1]:>9,} ok  RSS {samples[-1][2]:.0f} MiB", flush=True)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            server.terminate()
            server.wait(timeout=60)
    elapsed = samples[-1][0]
    print("\n| seconds | clients | requests ok | errors | wrong answers | requests/s | RSS first → last (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    print(f"| {elapsed:.0f} | {args.clients} | {counters.ok:,} | {counters.errors} | {counters.wrong} | "
          f"{counters.ok / elapsed:,.0f} | {samples[0][2]:.0f} → {samples[-1][2]:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
