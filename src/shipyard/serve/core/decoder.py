"""Token-by-token generation on an ONNX decoder graph, feeding its key/value cache back each step.

The prompt runs through the graph once (prefill); after that each step feeds only the newest token and
the cache (`present` becomes the next `past`), so a long generation never recomputes its prefix. The
caches of recent prompts are kept too, so a request whose prompt starts with one of them (a repeated
system prompt, a conversation so far) computes only what follows. Decoding is greedy unless the request
sets a temperature (then sampled, seeded by `seed` if given).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shipyard.artifact.manifest import GenerationRecord, Manifest
from shipyard.dtypes import numpy_of
from shipyard.errors import InvalidInputError, ModelLoadError
from shipyard.serve.core.runtime import OrtRuntime
from shipyard.tokenizer import load_tokenizer


@dataclass
class Usage:
    """Token counts of one generation; `computed_tokens` counts positions run through the graph."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    computed_tokens: int = 0

    def parameters(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "computed_tokens": self.computed_tokens}  # fmt: skip


def _int_parameter(parameters: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = parameters.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInputError(f"parameter {name!r} must be a whole number from {low} to {high}, got {value!r}")
    return value


class Generation:
    """One request's generation: validated when made, run while iterated (yields text pieces)."""

    def __init__(self, decoder: Decoder, prompt: str, parameters: dict[str, Any]) -> None:
        record = decoder.record
        ids = decoder.tokenizer.encode(prompt).ids
        if not ids:
            raise InvalidInputError("text_input is empty: there is nothing to continue")
        if len(ids) >= record.context:
            raise InvalidInputError(f"the prompt has {len(ids)} tokens; the model's context is {record.context}")
        limit = record.max_new_tokens
        self.max_tokens = min(_int_parameter(parameters, "max_tokens", limit, 1, limit), record.context - len(ids))
        temperature = parameters.get("temperature", 0.0)
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 10:
            raise InvalidInputError(f"parameter 'temperature' must be a number from 0 to 10, got {temperature!r}")
        self.temperature = float(temperature)
        seed = parameters.get("seed")
        self.rng = np.random.default_rng(None if seed is None else _int_parameter(parameters, "seed", 0, 0, 2**63 - 1))
        self.decoder, self.ids = decoder, ids
        self.usage = Usage(prompt_tokens=len(ids))

    def _pick(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        scaled = (logits - logits.max()) / self.temperature
        weights = np.exp(scaled.astype(np.float64))
        return int(self.rng.choice(len(weights), p=weights / weights.sum()))

    async def run(self, deadline: float | None = None) -> AsyncIterator[str]:
        """Pieces of text as tokens come; TimeoutError when a step would end past `deadline` (loop time)."""
        gen = self.decoder
        known, past, logits = gen.cached_prefix(self.ids)
        pending = self.ids[known:]  # positions not in the cache yet
        produced: list[int] = []
        emitted = ""
        for _ in range(self.max_tokens):
            if pending:
                feeds = {"input_ids": np.asarray([pending], dtype=gen.ids_dtype), "past": past}
                async with asyncio.timeout_at(deadline):
                    outputs = await gen.runtime.infer(feeds)
                self.usage.computed_tokens += len(pending)
                logits, past = outputs[gen.logits_index][0, -1], outputs[gen.present_index]
                if not produced:  # the whole prompt is in `past` now
                    gen.remember(self.ids, past, logits)
            assert logits is not None  # a cache hit brings the prompt's last logits; a miss computes them
            token = self._pick(logits)
            if token == gen.record.eos_token_id:
                break
            produced.append(token)
            self.usage.completion_tokens = len(produced)
            text = gen.tokenizer.decode(produced)
            # Hold back a character whose bytes are not all generated yet, and text a decoder rewrote.
            if not text.endswith("\ufffd") and text.startswith(emitted):
                yield text[len(emitted) :]
                emitted = text
            pending = [token]
        text = gen.tokenizer.decode(produced)
        if text != emitted and text.startswith(emitted):
            yield text[len(emitted) :]


class Decoder:
    """A loaded language model: its tokenizer, cache layout, kept prompt caches, and the runtime of each step."""

    def __init__(self, folder: Path, manifest: Manifest, runtime: OrtRuntime) -> None:
        assert manifest.generation is not None
        self.record: GenerationRecord = manifest.generation
        self.name, self.version = manifest.name, str(manifest.version)
        self.tokenizer = load_tokenizer(folder / self.record.tokenizer_file)
        self.runtime = runtime
        graph = manifest.signature
        inputs = {t.name: t for t in graph.inputs}
        past = inputs["past"]
        kv, heads, width = past.shape[1], past.shape[2], past.shape[4]
        if not (isinstance(kv, int) and isinstance(heads, int) and isinstance(width, int)):
            raise ModelLoadError(f"{manifest.name}: the cache input 'past' needs fixed kv/heads/head_dim dimensions")
        self._cache_shape = (1, kv, heads, 0, width)
        self._cache_dtype = numpy_of(past.dtype)
        self.ids_dtype = numpy_of(inputs["input_ids"].dtype)
        names = [t.name for t in graph.outputs]
        self.logits_index, self.present_index = names.index("logits"), names.index("present")
        # prompt token ids → (the cache after them, the logits of their last position), least recent first
        self._prompts: OrderedDict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def cached_prefix(self, ids: list[int]) -> tuple[int, np.ndarray, np.ndarray | None]:
        """The longest kept prompt that `ids` starts with: (its length, its cache, its last logits), or
        (0, an empty cache, None). Cached arrays are never written to, so requests can share them."""
        best: tuple[int, ...] = ()
        for key in self._prompts:
            if len(best) < len(key) <= len(ids) and tuple(ids[: len(key)]) == key:
                best = key
        if not best:
            return 0, np.zeros(self._cache_shape, dtype=self._cache_dtype), None
        self._prompts.move_to_end(best)
        cache, logits = self._prompts[best]
        return len(best), cache, logits

    def remember(self, ids: list[int], cache: np.ndarray, logits: np.ndarray) -> None:
        if self.record.prefix_cache == 0:
            return
        self._prompts[tuple(ids)] = (cache, logits)
        self._prompts.move_to_end(tuple(ids))
        while len(self._prompts) > self.record.prefix_cache:
            self._prompts.popitem(last=False)

    def start(self, prompt: str, parameters: dict[str, Any]) -> Generation:
        return Generation(self, prompt, parameters)
