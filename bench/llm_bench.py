"""Language-model serving: the OpenAI API with streaming at concurrency 1, 4 and 16, against the in-process
floor (the same ONNX model through the same scheduler, no server) and transformers' generate() in PyTorch.

Models: a random-initialised Llama of about 88 M parameters (vocabulary 8192, hidden 768, intermediate
2048, 12 layers, 12 heads, 4 key/value heads) built through `shipyard build` as FP32, INT8 (dynamic) and
4-bit (MatMulNBits, int8 compute) variants; and, with --chat DIR, the chat example's trained folder.
Prompts are 128 tokens, completions 128 tokens (the model never emits its end token: its row of the
output layer is zero).

Run:  HF_HUB_OFFLINE=1 .venv/bin/python bench/llm_bench.py [--variants fp32,int8,int4] [--chat .examples/chat/model]
      [--workers 1,2]   (served rows for each `shipyard serve --workers N`; RSS is the whole process tree's)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from shipyard.pipeline import build
from shipyard.registry import LocalRegistry
from shipyard.registry.refs import parse_ref
from shipyard.serve.core.decoder import Decoder
from shipyard.serve.core.repository import serve_settings
from shipyard.serve.core.runtime import OrtRuntime
from shipyard.serve.core.sampling import Options
from shipyard.spec import load_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import start_server

PROMPT_TOKENS, NEW_TOKENS, VOCAB = 128, 128, 8192
VARIANTS = {
    "fp32": None,
    "int8": {"step": "quantize_dynamic"},
    "int4": {"step": "weight_only", "params": {"bits": 4, "block_size": 32, "accuracy_level": 4}},
}


def make_folder(folder: Path) -> None:
    """The ~88 M-parameter Llama, random-initialised, with a word-level tokenizer of exactly VOCAB words."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<eos>", "<unk>", *(f"w{i}" for i in range(VOCAB - 2))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[0].zero_()
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    rng = np.random.default_rng(0)
    lines = [" ".join(f"w{i}" for i in rng.integers(0, VOCAB - 2, 64)) for _ in range(16)]
    (folder.parent / "heldout.txt").write_text("\n".join(lines))


def random_prompt(index: int) -> str:
    """128 distinct words per stream, so no stream's prompt is another's prefix (no prefix-cache hits)."""
    rng = np.random.default_rng(1000 + index)
    return " ".join(f"w{i}" for i in rng.integers(0, VOCAB - 2, PROMPT_TOKENS))


def log_prompts(folder: Path) -> Any:
    """For the chat model: 128 tokens of its ship's log, starting at another entry for each stream."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = (Path(__file__).resolve().parents[1] / "src/shipyard/examples/chat/logbook.txt").read_text().splitlines()

    def prompt(index: int) -> str:
        ids = tokenizer.encode(" ".join(text[index % len(text) :])).ids[:PROMPT_TOKENS]
        return str(tokenizer.decode(ids))

    return prompt


def build_variant(root: Path, name: str, step: dict[str, Any] | None, registry: LocalRegistry) -> float:
    """Build one variant from root/hf, judged on root/heldout.txt; returns its size in bytes."""
    spec: dict[str, Any] = {
        "name": name,
        "model": {"format": "huggingface", "path": "hf", "task": "text-generation",
                  "generation": {"max_new_tokens": NEW_TOKENS, "max_running": 16, "context": 512}},
        "evaluation": {"dataset": {"kind": "text", "path": "heldout.txt", "window": 64}, "metric": "perplexity"},
    }  # fmt: skip
    if step is not None:  # forced: the comparison needs the variant whatever its perplexity does
        spec["optimize"] = {"steps": [step], "objective": "size", "max_drop": 10.0, "relative": True,
                            "min_token_agreement": 0.0}  # fmt: skip
    if root.name == "chat":
        spec["model"]["generation"]["context"] = None  # its own (512)
        spec["evaluation"]["dataset"]["window"] = 64
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    start = time.perf_counter()
    manifest = build(load_spec(path), registry)
    print(f"built {name}: {manifest.metrics['size_bytes'] / 2**20:.0f} MiB, perplexity "
          f"{manifest.metrics.get('perplexity', float('nan')):.1f}, in {time.perf_counter() - start:.0f} s",
          flush=True)  # fmt: skip
    return float(manifest.metrics["size_bytes"])


def in_process(registry: LocalRegistry, name: str, prompt: Any) -> dict[str, float]:
    """The floor: the server's own decoder and scheduler, fed directly."""

    async def measure() -> dict[str, float]:
        record = registry.resolve(parse_ref(name))
        folder, manifest = registry.path(record), registry.manifest(record)
        runtime = OrtRuntime(folder, manifest, serve_settings(manifest), None)
        await runtime.load()
        decoder = Decoder(folder, manifest)
        decoder.attach(runtime.exclusive_session())
        try:
            out: dict[str, float] = {}
            for batch in (1, 16):
                generations = [decoder.start(prompt(i), Options(max_tokens=NEW_TOKENS)) for i in range(batch)]
                start = time.perf_counter()
                for g in generations:
                    g.submit()
                await asyncio.gather(*(_drain(g) for g in generations))
                elapsed = time.perf_counter() - start
                tokens = sum(g.usage.completion_tokens for g in generations)
                out[f"tps_{batch}"] = tokens / elapsed
                out[f"ttft_{batch}"] = statistics.median(g.first_token_s or 0.0 for g in generations)
                out[f"itl_{batch}"] = statistics.median(x for g in generations for x in g.token_gaps)
            return out
        finally:
            decoder.detach()
            await runtime.unload()

    return asyncio.run(measure())


async def _drain(generation: Any) -> None:
    async for _ in generation.run():
        pass


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and of its children (a supervisor's workers), in MiB."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) / 1024
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += _rss_mb(int(child))
    return total


def served(
    registry: LocalRegistry, name: str, concurrency: list[int], prompt: Any, workers: int = 1
) -> tuple[dict[int, dict[str, float]], float]:
    import openai

    port = 18700
    server = start_server(registry.root, name, port, port + 1, ("--workers", str(workers)))
    try:

        async def run(streams: int) -> dict[str, float]:
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none") as client:

                async def one(index: int) -> tuple[float, list[float], int]:
                    start = time.perf_counter()
                    arrivals = []
                    stream = await client.completions.create(model=name, prompt=prompt(index), max_tokens=NEW_TOKENS,
                                                             stream=True)  # fmt: skip
                    async for chunk in stream:
                        if chunk.choices and chunk.choices[0].text:
                            arrivals.append(time.perf_counter())
                    return arrivals[0] - start, list(np.diff(arrivals)), len(arrivals)

                await one(99)  # warm-up
                start = time.perf_counter()
                results = await asyncio.gather(*(one(i) for i in range(streams)))
                elapsed = time.perf_counter() - start
            ttft = [r[0] for r in results]
            gaps = [g for r in results for g in r[1]]
            return {"ttft_p50": statistics.median(ttft), "ttft_p99": float(np.percentile(ttft, 99)),
                    "itl_p50": statistics.median(gaps), "itl_p99": float(np.percentile(gaps, 99)),
                    "tps": sum(r[2] for r in results) / elapsed}  # fmt: skip

        out = {streams: asyncio.run(run(streams)) for streams in concurrency}
        return out, _rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)


def transformers_generate(folder: Path) -> dict[int, float]:
    """What a user would run otherwise: transformers' generate() in PyTorch, greedy, tokens/s."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = {}
    for batch in (1, 16):
        ids = torch.from_numpy(np.random.default_rng(5).integers(2, VOCAB, (batch, PROMPT_TOKENS)))
        with torch.no_grad():
            model.generate(ids[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        out[batch] = batch * NEW_TOKENS / (time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="fp32,int8,int4")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--chat", type=Path, default=None, help="the chat example's model/ folder (optional)")
    parser.add_argument("--workers", default="1", help="served rows for each of these `--workers` counts")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="llm-bench-") as scratch:
        root = Path(scratch)
        make_folder(root / "hf")
        registry = LocalRegistry(root / "registry")
        reference = transformers_generate(root / "hf")
        print(f"transformers generate(): {reference[1]:.1f} tokens/s at batch 1, {reference[16]:.1f} at batch 16")
        rows = []
        models = [("llama88m", root, random_prompt)]
        if args.chat is not None:  # the chat example's trained folder, judged on its own held-out text
            shutil.copytree(args.chat, root / "chat" / "hf")
            shutil.copyfile(args.chat.parent / "heldout.txt", root / "chat" / "heldout.txt")
            models.append(("chat", root / "chat", log_prompts(args.chat)))
        for model, folder, prompt in models:
            for variant in args.variants.split(","):
                name = f"{model}-{variant}"
                size = build_variant(folder, name, VARIANTS[variant], registry)
                floor = in_process(registry, name, prompt)
                for workers in (int(w) for w in args.workers.split(",")):
                    results, rss = served(registry, name, concurrency, prompt, workers)
                    label = name if args.workers == "1" else f"{name} ({workers} worker{'s' * (workers > 1)})"
                    rows.append((label, size, floor, results, rss))
    print()
    print(f"prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new; transformers generate(): {reference[1]:.1f} tok/s (b1), "
          f"{reference[16]:.1f} tok/s (b16)")  # fmt: skip
    print(
        "| variant | MiB | RSS MiB | floor b1 tok/s | floor b16 tok/s | floor TTFT b1 ms | floor ITL b1 ms | streams | "
        "TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | tok/s | vs generate() b1 | ITL / floor | TTFT / floor |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant, size, floor, results, rss in rows:
        for streams, r in results.items():
            print(f"| {variant} | {size / 2**20:.0f} | {rss:.0f} | {floor['tps_1']:.1f} | {floor['tps_16']:.1f} | "
                  f"{floor['ttft_1'] * 1e3:.0f} | {floor['itl_1'] * 1e3:.2f} | {streams} | {r['ttft_p50'] * 1e3:.0f} | "
                  f"{r['ttft_p99'] * 1e3:.0f} | {r['itl_p50'] * 1e3:.2f} | {r['itl_p99'] * 1e3:.2f} | {r['tps']:.1f} | "
                  f"{r['tps'] / reference[1]:.2f}x | {r['itl_p50'] / floor['itl_1']:.2f} | "
                  f"{r['ttft_p50'] / floor['ttft_1']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
