"""The artifact manifest: what a version is, where it came from and how it measured."""

from __future__ import annotations

import platform
import sys
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shipyard import __version__
from shipyard.spec.models import NAME_PATTERN, SignatureSpec, TensorSpec

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Record):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class LineageStep(_Record):
    """One pipeline step: what ran, with which parameters, on what, producing what."""

    step: str
    params: dict[str, Any] = Field(default_factory=dict)
    input_sha256: str | None = None
    output_sha256: str | None = None
    seconds: float = 0.0


class TokenizerRecord(_Record):
    """The artifact's tokenizer: clients send strings under `input`; it fills the graph's `feeds`."""

    file: str
    input: str
    max_length: int
    feeds: list[str]

    def served(self, graph: SignatureSpec) -> SignatureSpec:
        """The graph's signature as clients see it: one string input in place of the token-id inputs."""
        text = TensorSpec(name=self.input, dtype="string", shape=["batch"])
        kept = [t for t in graph.inputs if t.name not in self.feeds]
        return SignatureSpec(inputs=[text, *kept], outputs=graph.outputs)


GENERATE_SIGNATURE = SignatureSpec(
    inputs=[TensorSpec(name="text_input", dtype="string", shape=[1])],
    outputs=[TensorSpec(name="text_output", dtype="string", shape=[1])],
)


class GenerationRecord(_Record):
    """A causal language model served token by token with continuous batching.

    The graph is ONNX Runtime GenAI's decoder layout: `input_ids` and `attention_mask` in, `logits` out, and
    per layer a past key and value [batch, kv_heads, sequence, head_size] whose present is written into the
    same buffer (GroupQueryAttention). The names are patterns with the layer number as %d."""

    tokenizer_file: str
    max_new_tokens: int
    context: int
    eos_token_ids: list[int]
    layers: int
    kv_heads: int
    head_size: int
    past_key: str = "past_key_values.%d.key"
    past_value: str = "past_key_values.%d.value"
    present_key: str = "present.%d.key"
    present_value: str = "present.%d.value"
    chat_template: str | None = None  # Jinja, as in the folder's tokenizer_config.json / chat_template.jinja
    special_tokens: dict[str, str] = Field(default_factory=dict)  # bos_token, eos_token: what templates use
    prefix_cache: int = 0  # prompts whose cache the server keeps
    max_running: int = 8  # sequences decoded together (cache slots)
    max_waiting: int = 64  # requests queued beyond those before new ones are refused
    prefill_chunk: int = 256  # prompt tokens run between two decode steps
    prefill_pace: float = 0.0  # while others decode, a prefill run takes about this many steps' time (0: off)
    # Sampling defaults for requests that leave them out (temperature, top_p, top_k, min_p,
    # repetition_penalty): the folder's generation_config.json as transformers reads it, then the spec's.
    sampling: dict[str, float] = Field(default_factory=dict)


class Manifest(_Record):
    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    version: int | None = None  # assigned by the registry when the version is published
    created_at: str
    description: str = ""
    format: str = "onnx"
    model_file: str
    signature: SignatureSpec
    files: list[FileEntry]
    content_hash: str
    metrics: dict[str, float] = Field(default_factory=dict)
    lineage: list[LineageStep] = Field(default_factory=list)
    environment: dict[str, str] = Field(default_factory=dict)
    spec: dict[str, Any] | None = None  # the build spec, for reproduction
    encryption: dict[str, str] | None = None  # {"algorithm", "key_id"} when the model file is sealed
    tokenizer: TokenizerRecord | None = None  # text models: strings in, token ids to the graph
    generation: GenerationRecord | None = None  # language models: text in, a stream of tokens out

    @property
    def served_signature(self) -> SignatureSpec:
        """What clients send and receive (differs from `signature`, the graph's, for text models)."""
        if self.generation is not None:
            return GENERATE_SIGNATURE
        return self.signature if self.tokenizer is None else self.tokenizer.served(self.signature)

    def interface(self) -> dict[str, Any]:
        """What the content hash covers besides the files: the graph's signature, the tokenizer and generation."""
        return interface(self.signature, self.tokenizer, self.generation)

    def file(self, path: str) -> FileEntry:
        return next(f for f in self.files if f.path == path)

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


def interface(
    signature: SignatureSpec, tokenizer: TokenizerRecord | None = None, generation: GenerationRecord | None = None
) -> dict[str, Any]:
    hashed = signature.model_dump(mode="json")
    # Keys only when present, so the hashes of plain models stay as they were.
    if tokenizer is not None:
        hashed["tokenizer"] = tokenizer.model_dump(mode="json")
    if generation is not None:
        hashed["generation"] = generation.model_dump(mode="json")
    return hashed


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def environment() -> dict[str, str]:
    """Versions of what produced the artifact (absent packages are left out)."""
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "shipyard": __version__}
    for dist in ("onnx", "onnxruntime", "torch", "scikit-learn", "skl2onnx", "numpy"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return env
