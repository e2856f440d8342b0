"""How a language model picks each next token: the options a request may set, checked in one declaration,
and the per-sequence sampler the scheduler runs on each step's logits.

The order is vLLM's and transformers': logit bias and the penalties change the logits, then temperature
scales them, then top-k, top-p and min-p cut the distribution the token is drawn from. Temperature 0 is
greedy. A seed makes a request's draws its own: the same seed gives the same tokens whatever else shares
the batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shipyard.errors import InvalidInputError
from shipyard.serve.core.constraint import Constrained

MAX_STOPS = 4  # stop strings per request, as OpenAI allows
MAX_STOP_CHARS = 1000  # characters per stop string
MAX_LOGIT_BIAS = 300  # entries of logit_bias, as OpenAI allows
_CONSTRAINTS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class Options(BaseModel):
    """What a request may set (the same names on the OpenAI routes, V2 generate and gRPC streaming), checked.
    A field left out takes the model's default (its generation_config.json, or the spec's), else OpenAI's."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)  # strict: "1" and true are no numbers

    max_tokens: int | None = Field(default=None, ge=1, le=2**31)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM's extension: 0 or -1 turn it off
    min_p: float | None = Field(default=None, ge=0, le=1)  # vLLM's extension
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)  # vLLM's extension (transformers')
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] = Field(default_factory=dict,
                                                                            max_length=MAX_LOGIT_BIAS)  # fmt: skip
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] = Field(
        default_factory=list, max_length=MAX_STOPS
    )
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=64)  # extension
    min_tokens: int = Field(default=0, ge=0)  # extension: the end token is held back until this many
    ignore_eos: bool = False  # extension, for benchmarks: the end token is never generated
    logprobs: int | None = Field(default=None, ge=0, le=20)  # each token's logprob and this many alternatives
    # Structured output (vLLM's names; OpenAI's response_format becomes guided_json): at most one.
    guided_json: dict[str, Any] | None = None
    guided_regex: str | None = Field(default=None, min_length=1, max_length=10_000)
    guided_choice: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=1,
                                                                            max_length=1000)  # fmt: skip
    guided_grammar: str | None = Field(default=None, min_length=1, max_length=100_000)  # Lark

    @model_validator(mode="after")
    def _one_constraint(self) -> Options:
        chosen = [name for name in _CONSTRAINTS if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ValueError(f"set one of {', '.join(chosen)}, not several")
        return self

    @property
    def constraint(self) -> tuple[str, Any, str] | None:
        """(kind, value, field) of the structured-output constraint, if the request set one."""
        for name in _CONSTRAINTS:
            value = getattr(self, name)
            if value is not None:
                return name.removeprefix("guided_"), value, name
        return None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _token_keys(cls, value: Any) -> Any:
        """OpenAI's JSON has token ids as string keys: "50256": -100."""
        if isinstance(value, dict):
            keys = [int(k) if isinstance(k, str) and k.isdigit() and len(k) <= 9 else k for k in value]
            return dict(zip(keys, value.values(), strict=True))
        return value


def options_of(parameters: dict[str, Any], known_only: bool = False) -> Options:
    """A request's options (InvalidInputError naming the first field that is wrong). `known_only`: take only
    the fields Options declares and leave the rest to the caller (V2 parameters are an open map)."""
    fields = {k: v for k, v in parameters.items() if k in Options.model_fields} if known_only else parameters
    try:
        return Options.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise invalid(exc) from None


def invalid(exc: ValidationError) -> InvalidInputError:
    """A pydantic error as one InvalidInputError naming its field (`messages[0].role`), without echoing the
    value a client sent (it may be huge or deeply nested)."""
    error = exc.errors(include_input=False, include_url=False)[0]
    fields = [part for part in error["loc"] if isinstance(part, int) or _is_field(part)]
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in fields).lstrip(".")
    if error["type"] == "extra_forbidden":
        return InvalidInputError(f"unknown field {param!r}: this server does not take it", param=param)
    message = error["msg"]
    return InvalidInputError(f"{param!r}: {message}" if param else message, param=param or None)


def _logprobs(x: np.ndarray, token: int, top: int) -> TokenLogprob:
    finite = x[np.isfinite(x)]
    total = float(finite.max() + np.log(np.exp(finite - finite.max()).sum()))  # log-sum-exp
    best = np.argpartition(-x, top)[:top] if 0 < top < x.size else np.arange(x.size if top else 0)
    best = best[np.argsort(-x[best])]
    return TokenLogprob(token, float(x[token]) - total, [(int(i), float(x[i]) - total) for i in best])


def _is_field(part: str) -> bool:
    """A location part that names a field, not the member of a union pydantic tried (`str`, `list[int]`,
    `TextPart`, `function-after[...]`)."""
    return part.isidentifier() and part.islower() and part not in ("str", "int", "float", "bool", "none")


@dataclass(frozen=True)
class TokenLogprob:
    """One drawn token's log-probability and the most likely alternatives at that step, from the logits the
    sampler drew from: after logit_bias, penalties and a grammar's mask, before temperature and truncation."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


class Sampler:
    """One sequence's next-token choice, from the logits of each step and the tokens it has seen."""

    def __init__(
        self, options: Options, defaults: dict[str, float], prompt: list[int], ends: frozenset[int],
        constrained: Constrained | None = None,
    ) -> None:  # fmt: skip
        def pick(name: str, fallback: float) -> float:
            value = getattr(options, name)
            return float(value if value is not None else defaults.get(name, fallback))

        self.temperature = pick("temperature", 1.0)
        self.top_p = pick("top_p", 1.0)
        self.top_k = int(pick("top_k", 0))
        self.min_p = pick("min_p", 0.0)
        self.repetition = pick("repetition_penalty", 1.0)
        self.presence, self.frequency = options.presence_penalty, options.frequency_penalty
        self.bias = (np.fromiter(options.logit_bias, np.int64), np.fromiter(options.logit_bias.values(), np.float64))
        self.rng = np.random.default_rng(None if options.seed is None else options.seed % 2**64)
        # The tokens that end the sequence (its end tokens unless ignored, and the request's stop_token_ids).
        self.ends = (frozenset() if options.ignore_eos else ends) | frozenset(options.stop_token_ids)
        self._eos = np.fromiter(ends, np.int64)  # never drawn with ignore_eos
        self._ends = np.fromiter(self.ends, np.int64)  # not drawn before min_tokens
        self.ignore_eos, self.min_tokens = options.ignore_eos, options.min_tokens
        self.constrained = constrained  # structured output: the grammar's mask, each step
        # One entry per drawn token when the request asked for logprobs (written here, on the scheduler's
        # thread, before the token is handed over; read by the consumer once it has the token).
        self.top_logprobs = options.logprobs
        self.logprobs: list[TokenLogprob] | None = [] if options.logprobs is not None else None
        self.seen = set(prompt)  # what the repetition penalty looks at: the prompt and the output
        self.produced: Counter[int] = Counter()  # what presence and frequency penalties look at: the output
        # Nothing changes the logits before they are drawn from: the row is used as it is, not copied.
        self._plain = (not options.logit_bias and self.repetition == 1.0 and not self.presence and not self.frequency
                       and not options.ignore_eos and not options.min_tokens and constrained is None)  # fmt: skip

    def pick(self, logits: np.ndarray) -> int:
        """The next token from one row of logits [vocabulary]."""
        x = logits if self._plain else self._adjusted(logits)
        token = int(x.argmax()) if self.temperature == 0 else self._draw(np.asarray(x, np.float64) / self.temperature)
        if self.logprobs is not None:
            self.logprobs.append(_logprobs(np.asarray(x, np.float64), token, self.top_logprobs or 0))
        if self.constrained is not None and token not in self.ends:
            self.constrained.consume(token)
        self.seen.add(token)
        self.produced[token] += 1
        return token

    def _adjusted(self, logits: np.ndarray) -> np.ndarray:
        x = logits.astype(np.float64)
        ids, values = self.bias
        if ids.size:
            inside = ids < x.size
            x[ids[inside]] += values[inside]
        if self.repetition != 1.0 and self.seen:
            seen = np.fromiter(self.seen, np.int64)
            seen = seen[seen < x.size]
            row = x[seen]
            x[seen] = np.where(row > 0, row / self.repetition, row * self.repetition)
        if self.produced and (self.presence or self.frequency):
            ids = np.fromiter(self.produced, np.int64)
            counts = np.fromiter(self.produced.values(), np.float64)
            x[ids] -= self.frequency * counts + self.presence
        if self.ignore_eos:
            x[self._eos[self._eos < x.size]] = -np.inf
        if self.min_tokens and sum(self.produced.values()) < self.min_tokens:
            x[self._ends[self._ends < x.size]] = -np.inf
        if self.constrained is not None:
            self.constrained.mask(x)
        return x

    @property
    def finished(self) -> bool:
        """Structured output that is complete: the grammar takes no more tokens."""
        return self.constrained is not None and self.constrained.finished

    def _draw(self, x: np.ndarray) -> int:
        if 0 < self.top_k < x.size:
            kth = np.partition(x, -self.top_k)[-self.top_k]
            x = np.where(x < kth, -np.inf, x)
        weights = np.exp(x - x.max())
        weights /= weights.sum()
        if self.min_p > 0:
            weights = np.where(weights < self.min_p * weights.max(), 0.0, weights)
        if self.top_p < 1.0:
            order = np.argsort(-weights)
            keep = order[: int(np.searchsorted(np.cumsum(weights[order]), self.top_p)) + 1]
            return int(self.rng.choice(keep, p=weights[keep] / weights[keep].sum()))
        return int(self.rng.choice(weights.size, p=weights / weights.sum()))
