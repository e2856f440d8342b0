"""A shared system prompt, different questions: time to first token with the prefix cache's block sharing
against the same requests with the prefix cache off (what a prompt that diverges from every kept one got
before: a whole prefill), one request at a time, in process (the server's decoder and scheduler).

Run:  .venv/bin/python bench/prefix_reuse.py REGISTRY NAME[:VERSION] [--system-tokens 256] [--requests 8]
      (a language model built by `shipyard build`; the system prompt is English prose from GPL-3's text)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from shipyard.artifact.manifest import Manifest
from shipyard.registry import LocalRegistry
from shipyard.registry.refs import parse_ref
from shipyard.serve.core.decoder import Decoder
from shipyard.serve.core.repository import serve_settings
from shipyard.serve.core.runtime import OrtRuntime
from shipyard.serve.core.sampling import Options

QUESTIONS = ["What may I copy?", "Can I sell it?", "Who holds the copyright?", "What is source code?",
             "May I change it?", "What about patents?", "Is there a warranty?", "When does it end?"]  # fmt: skip


def first_tokens(folder: Path, manifest: Manifest, prompts: list[str]) -> list[float]:
    runtime = OrtRuntime(folder, manifest, serve_settings(manifest), None, 1, None)
    asyncio.run(runtime.load())
    decoder = Decoder(folder, manifest)
    decoder.attach(runtime.exclusive_session())

    async def one(prompt: str) -> float:
        generation = decoder.start(prompt, Options(max_tokens=1, temperature=0.0))
        generation.submit()
        start = time.perf_counter()
        async for _ in generation.run():
            pass
        return time.perf_counter() - start

    try:
        return [asyncio.run(one(p)) for p in prompts]
    finally:
        decoder.detach()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("registry", type=Path)
    parser.add_argument("ref")
    parser.add_argument("--system-tokens", type=int, default=256)
    parser.add_argument("--requests", type=int, default=8)
    args = parser.parse_args()
    registry = LocalRegistry(args.registry)
    record = registry.resolve(parse_ref(args.ref))
    folder, manifest = registry.path(record), registry.manifest(record)
    assert manifest.generation is not None, "not a language model"
    words = Path("/usr/share/common-licenses/GPL-3").read_text().split()
    system = " ".join(words[: args.system_tokens * 3 // 4])  # about 4/3 tokens per English word
    prompts = [f"{system}\n\nQuestion: {QUESTIONS[i % len(QUESTIONS)]} ({i})\nAnswer:" for i in range(args.requests)]
    off = manifest.model_copy(update={"generation": manifest.generation.model_copy(update={"prefix_cache": 0})})
    print("| prefix cache | TTFT first request ms | TTFT median of the rest ms |\n|---|---:|---:|")
    for label, used in (("off", off), ("on (blocks of 16)", manifest), ("off", off), ("on (blocks of 16)", manifest)):
        times = first_tokens(folder, used, prompts)
        print(f"| {label} | {times[0] * 1e3:.0f} | {statistics.median(times[1:]) * 1e3:.0f} |")


if __name__ == "__main__":
    main()
