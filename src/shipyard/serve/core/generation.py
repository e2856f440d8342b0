"""Generation for language models: the data plane's entry points that answer token by token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

import numpy as np

from shipyard.errors import InvalidInputError, TimedOutError
from shipyard.serve.core.decoder import Decoder, Generation
from shipyard.serve.core.loaded import LanguageModel, language_model
from shipyard.serve.core.repository import ModelRepository
from shipyard.serve.core.routing import answering
from shipyard.serve.core.runtime import as_text
from shipyard.serve.core.sampling import options_of
from shipyard.serve.core.validate import check_outputs, feeds_of
from shipyard.serve.policy.rollout import Rollout
from shipyard.serve.protocol.types import InferRequest, InferResponse, Tensor


class TextGeneration:
    """Starts checked generations and runs them under the request timeout, counting each in its statistics."""

    def __init__(
        self, repository: ModelRepository, rollout: Rollout, timeout_s: float | None, max_elements: int | None
    ) -> None:
        self.repository = repository
        self.rollout = rollout
        self.timeout_s = timeout_s
        self.max_elements = max_elements

    def generates(self, name: str, version: str | None) -> bool:
        return isinstance(answering(self.repository, self.rollout, name, version), LanguageModel)

    def decoder(self, name: str, version: str | None) -> Decoder:
        """The language model that answers a request for `name` (the rollout rules pick a versionless one)."""
        return language_model(answering(self.repository, self.rollout, name, version, draw=True)).decoder

    async def start(self, name: str, version: str | None, request: InferRequest) -> Generation:
        """A checked generation from a V2 request (`text_input`, parameters); nothing runs until it is streamed."""
        model = language_model(answering(self.repository, self.rollout, name, version, draw=True))
        return await self.start_on(model, request)

    async def start_on(self, handle: LanguageModel, request: InferRequest) -> Generation:
        decoder = handle.decoder
        check_outputs(handle, request)
        feeds, _ = feeds_of(handle, request, self.max_elements)
        prompt = as_text("text_input", feeds["text_input"])
        options = options_of(request.parameters, known_only=True)  # V2 parameters are an open map
        if options.logprobs is not None:
            raise InvalidInputError("logprobs are returned on the OpenAI routes (/v1/completions, "
                                    "/v1/chat/completions), not here", param="logprobs")  # fmt: skip
        # Tokenizing costs what the prompt makes it cost: off the event loop.
        return await asyncio.to_thread(decoder.start, str(prompt.reshape(-1)[0]), options)

    def admit(self, generation: Generation) -> None:
        """Queue a generation now, under the request timeout: a full queue is refused (OverloadedError) before
        a stream sends its first byte."""
        generation.submit(None if self.timeout_s is None else time.monotonic() + self.timeout_s)

    def admit_all(self, generations: list[Generation]) -> None:
        """Queue every one, or none: when the queue fills part-way, the ones queued are withdrawn."""
        try:
            for generation in generations:
                self.admit(generation)
        except BaseException:
            for generation in generations:
                generation.cancel()
            raise

    async def stream(self, generation: Generation) -> AsyncGenerator[str, None]:
        """Run a generation (admitted first if it was not), counting it in its model's statistics."""
        if not generation.submitted:
            self.admit(generation)
        stats = self.repository.get(generation.decoder.name, generation.decoder.version).stats
        start, ok = time.perf_counter_ns(), False
        try:
            async for piece in generation.run():
                yield piece
            ok = True
        except TimeoutError:
            raise TimedOutError(f"generation not finished within the {self.timeout_s:g} s request timeout") from None
        finally:
            stats.request_done(ok, time.perf_counter_ns() - start, 1)
            stats.generation_done(generation)

    async def text(self, generation: Generation) -> str:
        return "".join([piece async for piece in self.stream(generation)])

    async def complete(self, generation: Generation, request: InferRequest) -> InferResponse:
        """A generation's whole answer as one `text_output` (plain infer, and /generate)."""
        text = await self.text(generation)
        output = Tensor("text_output", "BYTES", [1], np.array([text.encode()], dtype=object))
        decoder = generation.decoder
        return InferResponse(decoder.name, decoder.version, [output], request.id, generation.usage.parameters())
