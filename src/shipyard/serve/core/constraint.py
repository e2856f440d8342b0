"""Structured output: a grammar every token of a sequence must keep to — a JSON schema, a regular expression,
a choice of strings, or a Lark grammar — enforced with llguidance, the constrained-decoding library behind
llama.cpp's and ONNX Runtime GenAI's structured output (chosen for that, for its JSON-schema coverage, and
because its wheel needs neither torch nor a compiler here).

Each step the sequence's matcher says which tokens may come next; the others get a logit of -inf before the
token is drawn, and the drawn token is fed back. JSON is written compactly (", " and ": ", no other
whitespace), so a model cannot stall a reply on blanks.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import llguidance
import numpy as np
from tokenizers import Tokenizer

from shipyard.errors import InvalidInputError

_JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_of(kind: str, value: Any) -> str:
    """The llguidance grammar for a constraint: json (a schema), regex, choice (strings) or grammar (Lark)."""
    if kind == "json":
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(value), overrides=_JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidInputError(f"not a usable JSON schema: {exc}", param="guided_json") from None
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    return llguidance.LLMatcher.grammar_from_lark(value)


class Grammars:
    """One model's tokenizer as llguidance reads it (made on first use) and the matchers of its requests."""

    def __init__(self, tokenizer: Tokenizer, eos: list[int]) -> None:
        self._source, self._eos = tokenizer, eos
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(self._source.to_str(), eos_token=self._eos or None)
            return self._tokenizer

    def matcher(self, grammar: str, param: str) -> llguidance.LLMatcher:
        """A fresh matcher; InvalidInputError naming `param` when the grammar is not one (runs in a thread:
        compiling a large schema can take a while). The grammar is compiled once: a matcher made from a bad
        one does not raise but starts in its error state, which says why."""
        made = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if made.is_error():
            raise InvalidInputError(f"{param}: {made.get_error()[:500] or 'not a valid grammar'}", param=param)
        return made


class Constrained:
    """A sequence's matcher, turned into a mask over the model's logits each step."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def copy(self) -> Constrained:
        return Constrained(self.matcher.deep_copy())

    @property
    def finished(self) -> bool:
        """The grammar takes no more tokens (nothing but an end token could follow), or failed."""
        return bool(self.matcher.is_stopped())

    def mask(self, logits: np.ndarray) -> None:
        """-inf, in place, on every token the grammar does not allow next."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), np.uint8), bitorder="little")
        allowed = np.zeros(logits.size, dtype=bool)
        size = min(bits.size, logits.size)
        allowed[:size] = bits[:size].astype(bool)
        logits[~allowed] = -np.inf

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)
