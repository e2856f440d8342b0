"""A loaded language model: its tokenizer and chat template, request checks, and each request's generation.

The tokens come from the model's continuous-batching scheduler (scheduler.py); a `Generation` turns them
into text as they come (holding back a character whose bytes are not all generated yet, and text that may
be the start of a stop string), counts usage, and tells the scheduler when its client is gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from shipyard import chat_template
from shipyard.artifact.manifest import GenerationRecord, Manifest
from shipyard.dtypes import numpy_of
from shipyard.errors import InvalidInputError, ModelLoadError, ShipyardError, UnavailableError
from shipyard.kvcache import CacheSlots, StepRunner
from shipyard.serve.core import tools
from shipyard.serve.core.constraint import Constrained, Grammars, grammar_of
from shipyard.serve.core.sampling import Options, Sampler, TokenLogprob
from shipyard.serve.core.scheduler import Scheduler, Sequence
from shipyard.tokenizer import load_tokenizer

_FIM = (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
        ("<PRE>", "<SUF>", "<MID>"))  # fmt: skip


@dataclass
class Usage:
    """Token counts of one generation; `computed_tokens` counts prompt positions run through the graph."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    computed_tokens: int = 0

    def parameters(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "computed_tokens": self.computed_tokens}  # fmt: skip


@dataclass
class Generation:
    """One request's generation: checked when made, run while iterated (yields text pieces)."""

    decoder: Decoder
    ids: list[int]
    options: Options
    max_tokens: int
    usage: Usage = field(default_factory=Usage)
    constrained: Constrained | None = None  # structured output: its grammar's matcher
    finish_reason: str | None = None  # "stop" or "length" once finished
    first_token_s: float | None = None  # arrival to the first token
    queued_s: float | None = None  # arrival to admission
    token_gaps: list[float] = field(default_factory=list)  # seconds between consecutive tokens

    _sequence: Sequence | None = None

    def choices(self, n: int, param: str = "n") -> list[Generation]:
        """This generation and n - 1 more of the same prompt (OpenAI's `n`, or `best_of`: the field `param`
        names); with a seed, choice i draws with seed + i, so the set repeats. The prompt is prefilled once:
        the others find its cache in the prefix cache (they are admitted after it)."""
        if n > self.decoder.record.max_running:
            raise InvalidInputError(f"{param!r} is {n}; this model decodes at most "
                                    f"{self.decoder.record.max_running} sequences together", param=param)  # fmt: skip
        seed = self.options.seed
        return [self, *(Generation(self.decoder, self.ids, self.options if seed is None else
                                   self.options.model_copy(update={"seed": (seed + i) % 2**64}),
                                   self.max_tokens, Usage(prompt_tokens=self.usage.prompt_tokens),
                                   constrained=self.constrained.copy() if self.constrained else None)
                        for i in range(1, n))]  # fmt: skip

    def logprobs(self, since: int = 0) -> list[TokenLogprob]:
        """The drawn tokens' logprobs from token `since` on, up to the last token handed over (an empty list
        when the request did not ask for them)."""
        entries = self._sequence.sampling.logprobs if self._sequence is not None else None
        return [] if entries is None else entries[since : self.usage.completion_tokens]

    def submit(self, deadline: float | None = None) -> None:
        """Queue it for the scheduler (OverloadedError at once when the queue is full); `deadline` is
        time.monotonic() seconds."""
        record = self.decoder.record
        sampler = Sampler(self.options, record.sampling, self.ids, frozenset(record.eos_token_ids), self.constrained)
        sequence = Sequence(self.ids, self.max_tokens, sampler, asyncio.get_running_loop(), deadline)
        self.decoder.scheduler.submit(sequence)
        self._sequence = sequence

    @property
    def submitted(self) -> bool:
        return self._sequence is not None

    def cancel(self) -> None:
        """The client is gone (or has all it wants): the scheduler frees the slot at its next step."""
        if self._sequence is not None:
            self._sequence.cancelled = True

    async def run(self) -> AsyncIterator[str]:
        """Pieces of text as tokens come (after `submit`); TimeoutError when its deadline passes first."""
        sequence = self._sequence
        assert sequence is not None, "submit() first"
        text = _Detokenizer(self.decoder, tuple(self.options.stop))
        previous = sequence.arrived
        try:
            while True:
                event = await sequence.events.get()
                if isinstance(event, str):
                    if event == "stop":  # the end token is generated, so counted (as transformers, vLLM do)
                        self.usage.completion_tokens += 1
                    break
                now = time.monotonic()
                if self.first_token_s is None:
                    self.first_token_s = now - sequence.arrived
                    self.queued_s = (sequence.admitted or sequence.arrived) - sequence.arrived
                else:
                    self.token_gaps.append(now - previous)
                previous = now
                self.usage.completion_tokens += 1
                piece, stopped = text.add(event)
                if piece:
                    yield piece
                if stopped:
                    self.finish_reason = "stop"
                    return
            if event == "timeout":
                raise TimeoutError
            if event == "error":
                raise ShipyardError("the language model failed while generating (see the server log)")
            if event == "unloaded":
                raise UnavailableError(f"{self.decoder.name}:{self.decoder.version} was unloaded while generating")
            self.finish_reason = "stop" if event == "done" else event
            rest = text.flush()
            if rest:
                yield rest
        finally:
            self.cancel()  # finished, stopped early or abandoned: its slot is freed at the next step
            self.usage.computed_tokens = sequence.computed


class _StopString:
    """Finds one stop string in text that arrives piece by piece, in time linear in the text: a
    Knuth-Morris-Pratt matcher whose state is how much of the stop string the text ends with."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.state = 0
        self.fallback = [0] * len(stop)  # the longest proper prefix of stop[:i+1] that is also its suffix
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fallback[k - 1]
            k += stop[i] == stop[k]
            self.fallback[i] = k

    def feed(self, char: str) -> bool:
        """True when the text now ends with the whole stop string."""
        state, stop = self.state, self.stop
        while state and char != stop[state]:
            state = self.fallback[state - 1]
        state += char == stop[state]
        if state == len(stop):
            self.state = self.fallback[state - 1]
            return True
        self.state = state
        return False


class _Detokenizer:
    """Token ids → text pieces, decoding a short window each time (not the whole text per token)."""

    def __init__(self, decoder: Decoder, stop: tuple[str, ...]) -> None:
        self.tokenizer = decoder.tokenizer
        self.stops = [_StopString(s) for s in stop]
        self.ids: list[int] = []
        self.prefix = self.read = 0  # the window: ids[prefix:read] is decoded text already sent
        self.held = ""  # text that could be the start of a stop string

    def add(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        now = self.tokenizer.decode(self.ids[self.prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return "", False  # a character's bytes are not all there yet
        self.prefix, self.read = self.read, len(self.ids)
        return self._release(self.held + now[len(before) :])

    def _release(self, text: str) -> tuple[str, bool]:
        """The text that can be sent: all of it but what may begin a stop string, or what comes before the
        first stop string it completes. Only the new characters are read (the held ones were)."""
        if not self.stops:
            return text, False
        for at in range(len(self.held), len(text)):
            for stop in self.stops:
                if stop.feed(text[at]):
                    return text[: at + 1 - len(stop.stop)], True
        keep = max(stop.state for stop in self.stops)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """What is left at the end: held text, and an incomplete character as the decoder renders it."""
        sent = self.tokenizer.decode(self.ids[self.prefix : self.read])
        return self.held + self.tokenizer.decode(self.ids[self.prefix :])[len(sent) :]


class Decoder:
    """A loaded language model: tokenizer, chat template, and the scheduler that runs its sequences."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        assert manifest.generation is not None
        self.record: GenerationRecord = manifest.generation
        self.name, self.version = manifest.name, str(manifest.version)
        self.tokenizer = load_tokenizer(folder / self.record.tokenizer_file)
        self.grammars = Grammars(self.tokenizer, self.record.eos_token_ids)
        inputs = {t.name: t for t in manifest.signature.inputs}
        if "input_ids" not in inputs or self.record.past_key % 0 not in inputs:
            raise ModelLoadError(f"{manifest.name}: the graph lacks input_ids or {self.record.past_key % 0}")
        self._ids_dtype = numpy_of(inputs["input_ids"].dtype)
        self._cache_dtype = numpy_of(inputs[self.record.past_key % 0].dtype)
        self._template = None
        if self.record.chat_template is not None:
            self._template = chat_template.compile_template(self.record.chat_template, f"{self.name}:{self.version}")
        self.tool_format = tools.detect(self.record.chat_template)  # how its template writes tool calls
        self.fim = next((names for names in _FIM if all(self.tokenizer.token_to_id(n) is not None for n in names)),
                        None)  # fill-in-the-middle tokens (prefix, suffix, middle), for `suffix`  # fmt: skip
        logits = next((t for t in manifest.signature.outputs if t.name == "logits"), None)
        vocabulary = logits.shape[-1] if logits is not None and logits.shape else None
        self.vocabulary = vocabulary if isinstance(vocabulary, int) else None  # ids the graph's tables hold
        self.scheduler: Scheduler

    def attach(self, session: ort.InferenceSession) -> float:
        """Allocate the cache, warm the graph up (a prefill, then a decode step of every slot) and start the
        scheduler. Returns the decode step's time in seconds."""
        cache = CacheSlots(self.record, self.record.max_running, self._cache_dtype)
        runner = StepRunner(session, cache, self._ids_dtype)
        runner.run(0, np.ones((1, 2), dtype=self._ids_dtype), [2])
        ids = np.ones((cache.slots, 1), dtype=self._ids_dtype)
        runner.run(0, ids, [3] * cache.slots)
        start = time.perf_counter()
        runner.run(0, ids, [3] * cache.slots)
        step_s = time.perf_counter() - start
        self.scheduler = Scheduler(runner, self.record)
        self.scheduler.start()
        return step_s

    def detach(self) -> None:
        if hasattr(self, "scheduler"):
            self.scheduler.stop()

    @property
    def chat(self) -> bool:
        return self._template is not None

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt a conversation becomes under the model's chat template (with `tools`, as transformers'
        apply_chat_template passes them)."""
        if self._template is None:
            raise InvalidInputError(f"{self.name} has no chat template: use completions", param="messages")
        context = {"messages": messages, "add_generation_prompt": True, **self.record.special_tokens}
        if tools:
            context["tools"] = tools
        return chat_template.render(self._template, context)

    def infill(self, prefix: str, suffix: str) -> str:
        """The prompt that asks the model for what goes between prefix and suffix (prefix-suffix-middle order,
        as StarCoder, SmolLM, Qwen Coder and Code Llama were trained)."""
        if self.fim is None:
            raise InvalidInputError(f"{self.name} has no fill-in-the-middle tokens: 'suffix' needs a model "
                                    "trained with them", param="suffix")  # fmt: skip
        before, after, middle = self.fim
        return f"{before}{prefix}{after}{suffix}{middle}"

    def encode(self, text: str, templated: bool) -> list[int]:
        """Token ids of a prompt. A raw prompt gets the special tokens the tokenizer itself adds (a Llama
        tokenizer's BOS), as transformers, vLLM and llama.cpp give it, and one BOS, not two, when the text
        already begins with it; a prompt the chat template rendered gets none added (the template writes
        them, and transformers' apply_chat_template adds none either)."""
        # encode_batch, not encode: it lets go of the GIL, so a long prompt does not hold up the event loop.
        (encoding,) = self.tokenizer.encode_batch([text], add_special_tokens=not templated)
        ids: list[int] = encoding.ids
        if templated:
            return ids
        bos_text = self.record.special_tokens.get("bos_token")
        bos = self.tokenizer.token_to_id(bos_text) if bos_text else None
        if bos is not None and ids[:2] == [bos, bos] and bos_text and text.startswith(bos_text):
            del ids[0]
        return ids

    def start(self, prompt: str, options: Options, templated: bool = False) -> Generation:
        """A checked generation of `prompt` (`templated`: rendered by the chat template); nothing runs until
        it is iterated."""
        ids = self.encode(prompt, templated)
        if not ids:
            raise InvalidInputError("the prompt is empty: there is nothing to continue", param="prompt")
        if self.vocabulary is not None and max(ids) >= self.vocabulary:
            # Checked here, before batching: a bad id would fail the batched step of every sequence in it.
            raise InvalidInputError(
                f"the prompt has token id {max(ids)}, outside this model's vocabulary of {self.vocabulary} (its "
                "tokenizer knows more tokens than its graph)", param="prompt",
            )  # fmt: skip
        context = self.record.context
        if len(ids) >= context:
            raise InvalidInputError(
                f"the prompt has {len(ids)} tokens; this model's context is {context} (prompt and completion)",
                param="prompt", code="context_length_exceeded",
            )  # fmt: skip
        limit = min(self.record.max_new_tokens, context - len(ids))
        if options.max_tokens is not None and options.max_tokens > limit:
            raise InvalidInputError(
                f"max_tokens is {options.max_tokens}, but at most {limit} fit: the prompt has {len(ids)} tokens, "
                f"the context is {context} and the server allows {self.record.max_new_tokens} new ones",
                param="max_tokens", code="context_length_exceeded",
            )  # fmt: skip
        constrained = None
        if options.constraint is not None:  # compiled here, on the request's thread: a schema can be big
            kind, value, param = options.constraint
            constrained = Constrained(self.grammars.matcher(grammar_of(kind, value), param))
        return Generation(self, ids, options, options.max_tokens or limit, Usage(prompt_tokens=len(ids)),
                          constrained=constrained)  # fmt: skip
