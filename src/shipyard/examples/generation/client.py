"""Stream log entries from the served decoder: server-sent events over REST, then gRPC ModelStreamInfer.

Run: python client.py [--url 127.0.0.1:8050 --grpc 127.0.0.1:8051]   (after `shipyard apply` or
`shipyard serve logbook`)
"""

from __future__ import annotations

import argparse
import json
import queue
import time
import urllib.request
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient


def stream_sse(url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = json.dumps({"text_input": prompt, "max_tokens": max_tokens}).encode()
    request = urllib.request.Request(f"http://{url}/v2/models/logbook/generate_stream", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    start, first, pieces = time.perf_counter(), None, []
    with urllib.request.urlopen(request, timeout=30) as response:
        for line in response:  # one "data: {...}" line per event, then a blank line
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if event.get("final"):
                return {"text": "".join(pieces), "first_ms": first, "ms": (time.perf_counter() - start) * 1e3,
                        "pieces": len(pieces), **event}  # fmt: skip
            first = first if first is not None else (time.perf_counter() - start) * 1e3
            pieces.append(event["text_output"])
            print(event["text_output"], end="", flush=True)
    raise RuntimeError("the stream ended without a final event")


def stream_grpc(url: str, prompt: str, max_tokens: int) -> tuple[str, int, dict[str, int]]:
    client = grpcclient.InferenceServerClient(url)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    client.async_stream_infer("logbook", [text], parameters={"max_tokens": max_tokens},
                              enable_empty_final_response=True)  # fmt: skip
    pieces: list[str] = []
    try:
        while True:
            result, error = answers.get(timeout=30)
            if error is not None:
                raise RuntimeError(str(error))
            output = result.as_numpy("text_output")
            if output is not None:
                pieces.append(output[0].decode())
            parameters = result.get_response().parameters
            if parameters["triton_final_response"].bool_param:
                usage = {k: v.int64_param for k, v in parameters.items() if k != "triton_final_response"}
                return "".join(pieces), len(pieces), usage
    finally:
        client.stop_stream()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="127.0.0.1:8050")
    parser.add_argument("--grpc", default="127.0.0.1:8051")
    args = parser.parse_args()
    prompt = "Day 181: we sailed from"
    print(f"SSE  {prompt}", end="")
    sse = stream_sse(args.url, prompt, 96)
    print(f"\n     {sse['pieces']} events, first after {sse['first_ms']:.1f} ms, all in {sse['ms']:.0f} ms "
          f"({sse['completion_tokens'] / sse['ms'] * 1e3:.0f} tokens/s)")  # fmt: skip
    recomputed = sum(sse["prompt_tokens"] + i for i in range(sse["completion_tokens"]))
    print(f"     KV cache: {sse['computed_tokens']} positions computed for {sse['prompt_tokens']} prompt + "
          f"{sse['completion_tokens']} new tokens (without the cache: {recomputed})")  # fmt: skip
    body = json.dumps({"text_input": prompt, "max_tokens": 96}).encode()
    request = urllib.request.Request(f"http://{args.url}/v2/models/logbook/generate", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        again = json.load(response)
    print(f"     the same prompt again (/generate): {again['computed_tokens']} positions computed, "
          f"same text: {again['text_output'] == sse['text']} (the prompt's cache was kept)")  # fmt: skip
    text, responses, usage = stream_grpc(args.grpc, "Day 182: we sailed from Oslo toward", 48)
    print(f"gRPC Day 182: we sailed from Oslo toward{text}\n     {responses} streamed responses, {usage}")


if __name__ == "__main__":
    main()
