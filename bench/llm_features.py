"""What the OpenAI API's features cost on the server: JSON-schema-constrained generation against free
generation (alone, and sharing batches), `n` = 4 against `n` = 1, and `top_logprobs` against none.

Model: the 88 M-parameter Llama of llm_bench.py (hidden 768, 12 layers, 12 heads, 4 key/value heads),
random-initialised, with a byte-level BPE of up to 8,192 tokens trained here on the chat example's logbook
and some JSON (a word-level vocabulary cannot write JSON), built FP32 through `shipyard build` and served by
`shipyard serve`. Prompts are 128 tokens; free streams run `ignore_eos` for 64 tokens. The constrained
schema is an object of 10 bounded fields (enums, integers with ranges, booleans, short strings), so every
answer ends; its inter-token latency is compared with free streams of the same length.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python bench/llm_features.py
"""

from __future__ import annotations

import asyncio
import json
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
from shipyard.spec import load_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import start_server

NEW_TOKENS = 64
LOGBOOK = Path(__file__).resolve().parents[1] / "src/shipyard/examples/chat/logbook.txt"
SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "ship": {"enum": ["ark", "brig", "cog", "dhow"]}, "crew": {"type": "integer", "minimum": 1, "maximum": 99},
        "knots": {"type": "integer", "minimum": 0, "maximum": 40}, "north": {"type": "boolean"},
        "port": {"type": "string", "maxLength": 8}, "cargo": {"enum": ["salt", "tea", "wool"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 30}, "storm": {"type": "boolean"},
        "flag": {"type": "string", "maxLength": 6}, "sails": {"type": "integer", "minimum": 1, "maximum": 9},
    },
}  # fmt: skip
SCHEMA["required"] = list(SCHEMA["properties"])


def make_folder(folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    text = LOGBOOK.read_text().splitlines()
    tokenizer.train_from_iterator([*text, json.dumps(SCHEMA)] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                         max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                         tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    fast.save_pretrained(folder)


def prompt(index: int) -> str:
    """About 128 tokens of the logbook, from another line for each stream (no shared prefixes)."""
    lines = LOGBOOK.read_text().splitlines()
    return " ".join(lines[(index * 7) % len(lines) :])[:600]


async def streams(port: int, count: int, fields: list[dict[str, Any]]) -> list[tuple[float, list[float], int]]:
    """`count` concurrent chat streams, stream i with fields[i % len(fields)]: (TTFT, gaps, tokens) each."""
    import openai

    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0) as client:

        async def one(index: int) -> tuple[float, list[float], int]:
            start, arrivals = time.perf_counter(), []
            stream = await client.chat.completions.create(
                model="lm", messages=[{"role": "user", "content": prompt(index)}], stream=True,
                max_tokens=NEW_TOKENS, **fields[index % len(fields)],
            )  # fmt: skip
            async for chunk in stream:
                if chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].logprobs):
                    arrivals.append(time.perf_counter())
            return arrivals[0] - start, list(np.diff(arrivals)), len(arrivals)

        await one(99)  # warm-up
        return list(await asyncio.gather(*(one(i) for i in range(count))))


def summary(results: list[tuple[float, list[float], int]], elapsed: float | None = None) -> dict[str, float]:
    gaps = [g for r in results for g in r[1]]
    out = {"ttft_p50": statistics.median(r[0] for r in results), "itl_p50": statistics.median(gaps),
           "itl_p99": float(np.percentile(gaps, 99)), "tokens": sum(r[2] for r in results)}  # fmt: skip
    if elapsed:
        out["tps"] = out["tokens"] / elapsed
    return out


def timed(port: int, count: int, fields: list[dict[str, Any]]) -> tuple[list[tuple[float, list[float], int]], float]:
    start = time.perf_counter()
    results = asyncio.run(streams(port, count, fields))
    return results, time.perf_counter() - start


def main() -> None:
    free: dict[str, Any] = {"extra_body": {"ignore_eos": True}}
    constrained: dict[str, Any] = {"response_format": {"type": "json_schema",
                                                       "json_schema": {"name": "log", "schema": SCHEMA}}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="llm-features-") as scratch:
        root = Path(scratch)
        make_folder(root / "hf")
        spec = {"name": "lm", "model": {"format": "huggingface", "path": "hf", "task": "text-generation",
                                        "generation": {"max_new_tokens": NEW_TOKENS, "max_running": 16,
                                                       "context": 512}}}  # fmt: skip
        (root / "lm.yaml").write_text(yaml.safe_dump(spec))
        registry = LocalRegistry(root / "registry")
        build(load_spec(root / "lm.yaml"), registry)
        port = 18720
        server = start_server(registry.root, "lm", port, port + 1)
        rows = []
        try:
            timed(port, 16, [free, constrained])  # warm both paths up before anything is measured
            for streams_count in (1, 16):
                for name, fields in (("free", [free]), ("json_schema", [constrained])):
                    results, elapsed = timed(port, streams_count, fields)
                    rows.append((name, streams_count, summary(results, elapsed)))
            mixed, _ = timed(port, 16, [free, constrained])  # even streams free, odd ones constrained
            rows.append(("free, sharing batches with json_schema", 16, summary(mixed[0::2])))
            rows.append(("json_schema, sharing batches with free", 16, summary(mixed[1::2])))
            for n in (1, 4):  # one stream: TTFT is the figure (n choices' tokens interleave), median of 7 runs
                runs = [timed(port, 1, [{**free, "n": n}])[0][0] for _ in range(7)]
                rows.append((f"n={n} (TTFT median of 7)", 1, summary(runs)))
            for name, fields in (("no logprobs", free), ("top_logprobs 5", {**free, "logprobs": True,
                                                                              "top_logprobs": 5})):  # fmt: skip
                results, elapsed = timed(port, 16, [fields])
                rows.append((name, 16, summary(results, elapsed)))
        finally:
            server.terminate()
            server.wait(timeout=30)
    print("| run | streams | TTFT p50 ms | ITL p50 ms | ITL p99 ms | tokens | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, count, r in rows:
        tps = f"{r['tps']:.1f}" if "tps" in r else "—"
        print(f"| {name} | {count} | {r['ttft_p50'] * 1e3:.0f} | {r['itl_p50'] * 1e3:.2f} | {r['itl_p99'] * 1e3:.2f} | "
              f"{r['tokens']:.0f} | {tps} |")  # fmt: skip


if __name__ == "__main__":
    main()
