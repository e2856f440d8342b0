"""Talk to the served chat model with the official `openai` package: a chat, a streamed chat, a completion,
then 16 concurrent streams (continuous batching) and the server's token metrics.

Run: python client.py [--url http://127.0.0.1:8050 --metrics http://127.0.0.1:8052/metrics]
(after `shipyard apply` or `shipyard serve logbook-chat`)
"""

from __future__ import annotations

import argparse
import asyncio
import time
import urllib.request

import openai

SYSTEM = {"role": "system", "content": "You are the ship's logkeeper."}
MODEL = "logbook-chat"


def ask(client: openai.OpenAI, question: str) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=[SYSTEM, {"role": "user", "content": question}],
                                           max_tokens=96)  # fmt: skip
    usage = reply.usage
    assert usage is not None
    print(f"> {question}\n{reply.choices[0].message.content}\n  [{reply.choices[0].finish_reason}; "
          f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens]")  # fmt: skip


def stream(client: openai.OpenAI, question: str) -> None:
    start, first, pieces = time.perf_counter(), None, 0
    print(f"> {question} (streamed)")
    chunks = client.chat.completions.create(model=MODEL, messages=[SYSTEM, {"role": "user", "content": question}],
                                            max_tokens=96, stream=True)  # fmt: skip
    for chunk in chunks:
        text = chunk.choices[0].delta.content if chunk.choices else None
        if text:
            first = first if first is not None else time.perf_counter() - start
            pieces += 1
            print(text, end="", flush=True)
    print(f"\n  [{pieces} pieces; first after {1000 * (first or 0):.0f} ms, all after "
          f"{1000 * (time.perf_counter() - start):.0f} ms]")  # fmt: skip


async def concurrent(url: str, streams: int) -> None:
    async with openai.AsyncOpenAI(base_url=url, api_key="none") as client:

        async def one(day: int) -> int:
            tokens = 0
            chunks = await client.chat.completions.create(
                model=MODEL, max_tokens=64, stream=True, stream_options={"include_usage": True},
                messages=[SYSTEM, {"role": "user", "content": f"Where was the ship headed on day {day}?"}],
            )  # fmt: skip
            async for chunk in chunks:
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return tokens

        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(day) for day in range(1, streams + 1)))
        elapsed = time.perf_counter() - start
    total = sum(tokens)
    print(f"{streams} concurrent streams: {total} tokens in {elapsed:.2f} s ({total / elapsed:.0f} tokens/s)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8050", help="the server's HTTP address")
    parser.add_argument("--metrics", default="http://127.0.0.1:8052/metrics")
    args = parser.parse_args()
    url = f"{args.url.rstrip('/')}/v1"
    client = openai.OpenAI(base_url=url, api_key="none")  # no tokens configured: any key is accepted
    print("models:", ", ".join(m.id for m in client.models.list()))
    ask(client, "What does the log say for day 12?")
    ask(client, "Where was the ship headed on day 170?")  # a held-out day: the model has never seen it
    stream(client, "What does the log say for day 40?")
    completion = client.completions.create(model=MODEL, prompt="Day 7: we sailed from", max_tokens=24, stop=["."])
    print(f"> completion of 'Day 7: we sailed from' (stop at '.'):\n{completion.choices[0].text!r}")
    asyncio.run(concurrent(url, 16))
    try:
        with urllib.request.urlopen(args.metrics, timeout=10) as response:
            text = response.read().decode()
    except OSError as exc:
        print(f"metrics not reachable at {args.metrics}: {exc}")
        return
    wanted = ("shipyard_generated_tokens_total", "shipyard_time_to_first_token_seconds_count",
              "shipyard_batch_size_sum", "shipyard_batch_size_count", "shipyard_sequences_running")  # fmt: skip
    for line in text.splitlines():
        if line.startswith(wanted):
            print(line)


if __name__ == "__main__":
    main()
