"""OpenAI's completion answers, whole or streamed, built from a request's generations: choices in order (or
best_of's best), text with its echoed prompt, tool calls read from the text, logprobs in OpenAI's two
shapes, usage with the prompt counted once."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from shipyard.serve.core import tools
from shipyard.serve.core.decoder import Decoder, Generation
from shipyard.serve.core.generation import TextGeneration
from shipyard.serve.core.sampling import TokenLogprob
from shipyard.serve.transports.openai_schema import ChatRequest, CompletionRequest


class Answer:
    """One request's answer: its generations are admitted when it is made (a full queue is refused before
    anything is sent), then run by `whole` or `events`."""

    def __init__(self, request: ChatRequest | CompletionRequest, first: Generation, generating: TextGeneration) -> None:
        self.request, self.generating = request, generating
        self.chat = isinstance(request, ChatRequest)
        completion = request if isinstance(request, CompletionRequest) else None
        if completion is not None and completion.candidates > completion.n:
            self.generations = first.choices(completion.candidates, "best_of")
        else:
            self.generations = first.choices(request.n)
        self.echo = completion.text if completion is not None and completion.echo else ""
        kind = "chat.completion" if self.chat else "text_completion"
        self.head = {"id": f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
                     "created": int(time.time()), "model": request.model}  # fmt: skip
        self.sent = [0] * len(self.generations)  # tokens whose logprobs went out, per generation
        self.tool_format, self.tool_names = None, set()
        if isinstance(request, ChatRequest) and request.offered_tools:
            self.tool_format = first.decoder.tool_format
            self.tool_names = {t["function"]["name"] for t in request.offered_tools}
        generating.admit_all(self.generations)

    def cancel(self) -> None:
        for generation in self.generations:
            generation.cancel()

    def _read(self, text: str) -> tuple[str | None, list[tools.ToolCall]]:
        """(content, tool calls) of a whole answer."""
        if self.tool_format is None:
            return text, []
        return tools.parse(self.tool_format, text, self.tool_names)

    def _choice(
        self, index: int, text: str | None, finish: str | None, delta: bool, calls: list[tools.ToolCall] | None = None,
        source: int | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Choice `index` of the answer, from generation `source` (the same unless best_of reordered them)."""
        logprobs, source = None, index if source is None else source
        if self.request.wants_logprobs:
            entries = self.generations[source].logprobs(self.sent[source])
            logprobs = _logprobs(self.generations[source].decoder, entries, self.chat)
            self.sent[source] += len(entries)
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        key = "delta" if delta else "message"
        content: dict[str, Any] = {"content": text} if text is not None else {}
        if not delta:
            content = {"role": "assistant", "content": text if calls else text or ""}
        if calls:  # streamed as one delta each, with its index, as OpenAI's clients read them
            content["tool_calls"] = [{"index": i, **c.openai()} if delta else c.openai() for i, c in enumerate(calls)]
        return {"index": index, key: content, "logprobs": logprobs, "finish_reason": finish}

    async def whole(self) -> dict[str, Any]:
        try:
            texts = await asyncio.gather(*(self.generating.text(g) for g in self.generations))
        finally:
            self.cancel()
        choices = []
        for index, source in enumerate(_best(self.generations, self.request.n)):
            content, calls = self._read(texts[source])
            finish = "tool_calls" if calls else self.generations[source].finish_reason
            text = self.echo + (content or "") if self.echo else content
            choices.append(self._choice(index, text, finish, False, calls, source))
        return {**self.head, "choices": choices, "usage": _usage(self.generations)}

    async def events(self) -> AsyncGenerator[dict[str, Any], None]:
        chunk = {**self.head, "object": f"{self.head['object']}.chunk" if self.chat else self.head["object"]}
        if self.chat:  # each choice's first chunk names the role, as OpenAI's do
            for index in range(len(self.generations)):
                yield {**chunk, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]}  # fmt: skip
        if self.tool_format is not None:  # a call is known only once the answer is whole: each choice is one delta
            texts = await asyncio.gather(*(self.generating.text(g) for g in self.generations))
            for index, text in enumerate(texts):
                content, calls = self._read(text)
                yield {**chunk, "choices": [self._choice(index, content, None, True, calls)]}
                finish = "tool_calls" if calls else self.generations[index].finish_reason
                yield {**chunk, "choices": [self._choice(index, None, finish, delta=True)]}
        else:
            for index in range(len(self.generations) if self.echo else 0):  # the prompt first, as it was sent
                yield {**chunk, "choices": [{"index": index, "text": self.echo, "logprobs": None,
                                             "finish_reason": None}]}  # fmt: skip
            async for index, piece in _interleaved([self.generating.stream(g) for g in self.generations]):
                if piece is None:  # that choice is done
                    finish = self.generations[index].finish_reason
                    yield {**chunk, "choices": [self._choice(index, None if self.chat else "", finish, delta=True)]}
                else:
                    yield {**chunk, "choices": [self._choice(index, piece, None, delta=True)]}
        if self.request.include_usage:
            yield {**chunk, "choices": [], "usage": _usage(self.generations)}


def _logprobs(decoder: Decoder, entries: list[TokenLogprob], chat: bool) -> dict[str, Any]:
    """Tokens' logprobs in OpenAI's shapes: chat's `content` list, or the completions API's parallel lists."""

    def text(token: int) -> str:
        return str(decoder.tokenizer.decode([token], skip_special_tokens=False))

    if chat:

        def item(token: int, logprob: float) -> dict[str, Any]:
            piece = text(token)
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}  # fmt: skip
    tokens = [text(e.token) for e in entries]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=0)) if tokens else []
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}  # fmt: skip


def _best(generations: list[Generation], n: int) -> list[int]:
    """The n generations to answer with: all of them in order, or (best_of) the n whose tokens have the
    highest summed logprob, best first."""
    if len(generations) == n:
        return list(range(n))
    scores = [sum(e.logprob for e in g.logprobs()) for g in generations]
    return sorted(range(len(generations)), key=lambda i: -scores[i])[:n]


def _usage(generations: list[Generation]) -> dict[str, int]:
    """One prompt (it was prefilled once), every choice's completion."""
    prompt = generations[0].usage.prompt_tokens
    completion = sum(g.usage.completion_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _interleaved(streams: list[AsyncGenerator[str, None]]) -> AsyncGenerator[tuple[int, str | None], None]:
    """(index, piece) from every stream as they come, then (index, None) when that one ends; the first error
    ends them all."""
    if len(streams) == 1:  # the common case needs no tasks
        async for only in streams[0]:
            yield 0, only
        yield 0, None
        return
    arrived: asyncio.Queue[tuple[int, str | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[str, None]) -> None:
        try:
            async for piece in stream:
                await arrived.put((index, piece, None))
            await arrived.put((index, None, None))
        except Exception as exc:  # handed to the consumer, which raises it
            await arrived.put((index, None, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        ended = 0
        while ended < len(streams):
            index, piece, error = await arrived.get()
            if error is not None:
                raise error
            ended += piece is None
            yield index, piece
    finally:
        for task in tasks:
            task.cancel()
