"""Every bundled example end to end — init, train, build — then served: one table for the gallery.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python bench/examples_bench.py [--only text,generation] [--requests 200]

For each registered model: the evaluation metric before and after optimization (the build's own
figures), the artifact size, and batch-1 latency served over gRPC (tritonclient; language models: one
/generate call of 32 tokens over HTTP) against the same request run in process through the server's own
runtime (the ONNX Runtime floor, tokenizer included). Sequential requests after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tritonclient.grpc as grpcclient

from shipyard.dtypes import BY_NAME
from shipyard.onnxrt import random_feeds
from shipyard.registry import LocalRegistry
from shipyard.serve.core.decoder import Decoder
from shipyard.serve.core.repository import serve_settings
from shipyard.serve.core.runtime import OrtRuntime
from shipyard.serve.core.sampling import Options
from shipyard.spec.models import SignatureSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import start_server

EXAMPLES = {  # example → the specs its training script prepares, in build order
    "digits": ["shipyard.yaml"], "wine": ["shipyard.yaml"], "sensors": ["shipyard.yaml"],
    "recsys": ["shipyard.yaml"], "segmentation": ["shipyard.yaml"], "chat": ["shipyard.yaml"],
    "text": ["shipyard.yaml", "intent.yaml"],
}  # fmt: skip
SENTENCE = "will it rain in Lisbon tomorrow afternoon"
PROMPT = "Day 181: we sailed from"


def shipyard(*args: str, cwd: Path, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "shipyard", *args], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def prepare(example: str, work: Path, env: dict[str, str]) -> float:
    folder = work / example
    shipyard("init", str(folder), "--example", example, cwd=work, env=env)
    start = time.perf_counter()
    subprocess.run([sys.executable, "train.py"], cwd=folder, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    for spec in EXAMPLES[example]:
        shipyard("build", spec, cwd=folder, env=env)
    return time.perf_counter() - start


def percentiles(run: Callable[[], Any], count: int) -> tuple[float, float]:
    for _ in range(max(10, count // 10)):
        run()
    times = []
    for _ in range(count):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), float(np.percentile(times, 99))


def request_feeds(signature: SignatureSpec) -> dict[str, np.ndarray]:
    """One batch-1 request in the served signature: a sentence for string inputs, random tensors otherwise."""
    feeds = random_feeds(signature, batch=1, seed=1)
    return {k: (np.array([SENTENCE], dtype=object) if v.dtype == object else v) for k, v in feeds.items()}


def in_process(folder: Path, manifest: Any, count: int) -> tuple[float, float]:
    """The same request through the server's runtime (and decoder), without any transport."""

    async def measure() -> tuple[float, float]:
        runtime = OrtRuntime(folder, manifest, serve_settings(manifest), None)
        await runtime.load()
        try:
            if manifest.generation is None:
                feeds = request_feeds(manifest.served_signature)
                return percentiles(lambda: runtime.run_sync(feeds), count)
            decoder = Decoder(folder, manifest)
            decoder.attach(runtime.exclusive_session())
            times = []
            try:
                for _ in range(count // 4 + 5):
                    start = time.perf_counter()
                    generation = decoder.start(PROMPT, Options(max_tokens=32))
                    generation.submit()
                    async for _piece in generation.run():
                        pass
                    times.append((time.perf_counter() - start) * 1e3)
            finally:
                decoder.detach()
            return statistics.median(times[5:]), float(np.percentile(times[5:], 99))
        finally:
            await runtime.unload()

    return asyncio.run(measure())


def served(registry: LocalRegistry, name: str, manifest: Any, count: int) -> tuple[float, float]:
    http, grpc = 18600, 18601
    server = start_server(registry.root, name, http, grpc)
    try:
        if manifest.generation is not None:
            with httpx.Client() as client:
                body = {"text_input": PROMPT, "max_tokens": 32}
                url = f"http://127.0.0.1:{http}/v2/models/{name}/generate"
                return percentiles(lambda: client.post(url, json=body).raise_for_status(), count // 4)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        signature = manifest.served_signature
        feeds = request_feeds(signature)
        inputs = []
        for tensor in signature.inputs:
            data = feeds[tensor.name]
            item = grpcclient.InferInput(tensor.name, list(data.shape), BY_NAME[tensor.dtype].v2)
            item.set_data_from_numpy(np.array([s.encode() for s in data], dtype=object) if data.dtype == object
                                     else data)  # fmt: skip
            inputs.append(item)
        return percentiles(lambda: client.infer(name, inputs), count)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=",".join(EXAMPLES))
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="shipyard-examples-") as tmp:
        work = Path(tmp)
        registry = LocalRegistry(work / "registry")
        env["SHIPYARD_REGISTRY"] = str(registry.root)
        for example in args.only.split(","):
            seconds = prepare(example, work, env)
            print(f"{example}: trained and built in {seconds:.0f} s", file=sys.stderr)
        for record in registry.all_versions():
            manifest = registry.manifest(record)
            folder = registry.path(record)
            metric = manifest.spec["evaluation"]["metric"] if manifest.spec else {}
            name = metric["name"] if isinstance(metric, dict) else metric
            before = manifest.metrics.get(f"{name}_unoptimized", manifest.metrics.get(name))
            size_before = manifest.metrics.get("size_bytes_unoptimized", manifest.metrics["size_bytes"])
            floor = in_process(folder, manifest, args.requests)
            over_wire = served(registry, record.name, manifest, args.requests)
            rows.append((record.name, name, before, manifest.metrics.get(name), size_before,
                         manifest.metrics["size_bytes"], floor, over_wire))  # fmt: skip
    print("\n| model | metric | before → after optimization | size before → after | p50 in process (ms) "
          "| p50 served (ms) | p99 served (ms) | served / in-process p50 |")  # fmt: skip
    print("|---|---|---|---|---:|---:|---:|---:|")
    for model, metric, before, after, size_before, size, floor, wire in rows:
        print(f"| {model} | {metric} | {before:.4f} → {after:.4f} | {size_before / 1024:,.1f} → {size / 1024:,.1f} KiB "
              f"| {floor[0]:.3f} | {wire[0]:.3f} | {wire[1]:.3f} | {wire[0] / floor[0]:.1f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
