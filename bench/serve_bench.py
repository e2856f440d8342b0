"""Serving benchmark: perf_analyzer against `shipyard serve` on the reference MLP, versus in-process ONNX Runtime.

Run:  .venv/bin/python bench/serve_bench.py [--passes 3] [--window-ms 5000] [--concurrency 1 4 16] [--workers 1 2]

Prints a markdown table: throughput (inferences/s) and p50/p99 latency per worker count, protocol and
concurrency, each throughput also as a ratio to the in-process batch-1 floor measured in the same run.
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import time_runs  # noqa: E402
from reference import write_reference_mlp  # noqa: E402

from shipyard.onnxrt import session  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_process_floor(model: Path, seconds: float) -> dict[str, float]:
    """session.run in a loop, one intra-op thread: batch-1 inferences/s and p50, batch-64 samples/s."""
    sess = session(model)
    result = {}
    for batch in (1, 64):
        timed = time_runs(sess, {"input": np.random.default_rng(0).random((batch, 784), dtype=np.float32)}, seconds)
        result[f"b{batch}_per_s"] = timed["per_s"]
        result[f"b{batch}_p50_us"] = timed["p50_ms"] * 1e3
    return result


def start_server(
    registry: Path, http: int, grpc: int, workers: int = 1, frontend: str = "auto"
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "shipyard", "serve", "mlp", "--registry", str(registry),
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", "0",
           "--workers", str(workers), "--grpc-frontend", frontend]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{http}/v2/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not become ready: {proc.stderr.read().decode() if proc.stderr else ''}")


def perf_analyzer(tool: str, protocol: str, port: int, concurrency: int, window_ms: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".csv") as out:
        cmd = [tool, "-m", "mlp", "-u", f"127.0.0.1:{port}", "-i", protocol, "-b", "1",
               "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", str(window_ms),
               "--stability-percentage", "1000", "--max-trials", "3", "-f", out.name]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=window_ms / 1000 * 6 + 60)
        if run.returncode != 0:
            raise RuntimeError(f"perf_analyzer failed: {run.stdout[-2000:]} {run.stderr[-2000:]}")
        with open(out.name) as results:
            row = next(csv.DictReader(results))
    return {
        "per_s": float(row["Inferences/Second"]),
        "p50_us": float(row["p50 latency"]),
        "p99_us": float(row["p99 latency"]),
    }


def run_matrix(
    tool: str, targets: list[tuple[str, int]], concurrencies: list[int], passes: int, window_ms: int
) -> list[tuple[str, int, dict[str, float]]]:
    """perf_analyzer for every (protocol, port) x concurrency, `passes` times each; the medians."""
    rows = []
    for protocol, port in targets:
        for concurrency in concurrencies:
            runs = [perf_analyzer(tool, protocol, port, concurrency, window_ms) for _ in range(passes)]
            rows.append((protocol, concurrency, {k: statistics.median(r[k] for r in runs) for k in runs[0]}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--window-ms", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-queue-delay-ms", type=float, default=0.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="server worker processes to compare")
    parser.add_argument(
        "--grpc-frontends",
        nargs="+",
        default=["auto"],
        choices=["auto", "native", "python"],
        help="gRPC front ends to compare (HTTP is measured with the first)",
    )
    args = parser.parse_args()
    tool = subprocess.run(["bash", str(HERE / "fetch_perf_analyzer.sh")], capture_output=True, text=True, check=True)
    perf_tool = tool.stdout.strip().splitlines()[-1]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_reference_mlp(work / "mlp.onnx")
        spec = {"name": "mlp", "model": {"format": "onnx", "path": "mlp.onnx"},
                "serve": {"max_batch_size": 64, "max_queue_delay_ms": args.max_queue_delay_ms,
                          "intra_op_threads": 1, "instances": 1}}  # fmt: skip
        (work / "shipyard.yaml").write_text(yaml.safe_dump(spec))
        env = {**os.environ, "SHIPYARD_REGISTRY": str(work / "registry")}
        subprocess.run([sys.executable, "-m", "shipyard", "build", str(work / "shipyard.yaml")], env=env,
                       check=True, capture_output=True)  # fmt: skip
        floor = in_process_floor(work / "mlp.onnx", seconds=args.window_ms / 1000)
        rows = []
        for workers in args.workers:
            for i, frontend in enumerate(args.grpc_frontends):
                http, grpc = free_port(), free_port()
                server = start_server(work / "registry", http, grpc, workers, frontend)
                targets = [("http", http)] if i == 0 else []
                try:
                    matrix = run_matrix(
                        perf_tool, [*targets, ("grpc", grpc)], args.concurrency, args.passes, args.window_ms
                    )
                finally:
                    server.terminate()
                    server.wait(timeout=60)
                rows += [(workers, "" if protocol == "http" else f" ({frontend})", protocol, c, m)
                         for protocol, c, m in matrix]  # fmt: skip

    print(f"In-process ONNX Runtime floor (1 thread): batch 1 {floor['b1_per_s']:,.0f} inf/s "
          f"(p50 {floor['b1_p50_us']:.0f} µs); batch 64 {floor['b64_per_s']:,.0f} samples/s\n")  # fmt: skip
    print("| workers | protocol | concurrency | throughput (inf/s) | ratio to batch-1 floor | p50 (ms) | p99 (ms) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for workers, frontend, protocol, concurrency, m in rows:
        ratio = m["per_s"] / floor["b1_per_s"]
        print(f"| {workers} | {protocol}{frontend} | {concurrency} | {m['per_s']:,.0f} | {ratio:.2f}x | "
              f"{m['p50_us'] / 1000:.3f} | {m['p99_us'] / 1000:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
