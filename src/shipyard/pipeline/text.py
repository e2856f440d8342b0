"""Text in, text out: tokenizers in front of text models and behind language models.

A text model's tokenizer runs where the model runs (build-time evaluation, the server's worker threads),
after dynamic batching, so a batch is padded once, to its longest text. A language model's tokenizer
(checked and copied here at build) encodes prompts and decodes generated tokens in the server.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from shipyard.artifact.manifest import GenerationRecord, Manifest, TokenizerRecord
from shipyard.errors import ModelLoadError
from shipyard.spec.models import GenerationSpec, SignatureSpec, TokenizerSpec, resolve_path

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # the names Hugging Face exporters use
TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises bare Exceptions for unreadable files
        raise ModelLoadError(f"{path}: not a readable tokenizer.json: {str(exc).splitlines()[0]}") from None


def _tokenizer_file(path: str, base_dir: Path) -> Path:
    source = resolve_path(base_dir, path)
    if not source.is_file():
        raise ModelLoadError(f"tokenizer file not found: {source}")
    return source


def tokenizer_record(spec: TokenizerSpec, graph: SignatureSpec) -> TokenizerRecord:
    """Which graph inputs the tokenizer fills; ModelLoadError when the graph does not take token ids."""
    inputs = {t.name: t for t in graph.inputs}
    feeds = [name for name in TOKEN_INPUTS if name in inputs]
    if "input_ids" not in feeds:
        raise ModelLoadError(f"model.tokenizer: the graph has no input_ids input (its inputs: {', '.join(inputs)})")
    for name in feeds:
        tensor = inputs[name]
        if tensor.dtype not in ("int64", "int32") or len(tensor.shape) != 2 or isinstance(tensor.shape[1], int):
            raise ModelLoadError(f"model.tokenizer: graph input {name!r} must be int64/int32 [batch, sequence]")
    if spec.input in inputs:
        raise ModelLoadError(f"model.tokenizer.input {spec.input!r} is already an input of the graph")
    return TokenizerRecord(file=TOKENIZER_FILE, input=spec.input, max_length=spec.max_length, feeds=feeds)


class TextEncoder:
    """Strings → padded token-id arrays for the graph inputs named in the record."""

    def __init__(self, path: Path, record: TokenizerRecord, graph: SignatureSpec) -> None:
        tokenizer = load_tokenizer(path)
        tokenizer.enable_truncation(record.max_length)
        padding = tokenizer.padding or {}
        pad_token = padding.get("pad_token") or "[PAD]"
        pad_id = tokenizer.token_to_id(pad_token)
        tokenizer.enable_padding(pad_id=pad_id if pad_id is not None else 0, pad_token=pad_token)  # to the longest
        self.record = record
        self._tokenizer = tokenizer
        self._dtypes = {t.name: np.dtype(t.dtype) for t in graph.inputs if t.name in record.feeds}

    def encode(self, texts: np.ndarray) -> dict[str, np.ndarray]:
        encodings = self._tokenizer.encode_batch([str(t) for t in texts.reshape(-1)])
        width = len(encodings[0].ids) if encodings else 0
        columns = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        return {
            name: np.array(columns[name], dtype=self._dtypes[name]).reshape(len(encodings), width)
            for name in self.record.feeds
        }

    def apply(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Served feeds (texts under the record's input) → graph feeds."""
        graph_feeds = {name: array for name, array in feeds.items() if name != self.record.input}
        graph_feeds.update(self.encode(feeds[self.record.input]))
        return graph_feeds


def spec_encoder(spec: TokenizerSpec, graph: SignatureSpec, base_dir: Path, artifact_dir: Path) -> TextEncoder:
    """At build: check the tokenizer against the graph and copy its file into the artifact."""
    source = _tokenizer_file(spec.path, base_dir)
    record = tokenizer_record(spec, graph)
    encoder = TextEncoder(source, record, graph)
    shutil.copyfile(source, artifact_dir / record.file)
    return encoder


def artifact_encoder(folder: Path, manifest: Manifest) -> TextEncoder | None:
    """A registered version's tokenizer, or None for models that take tensors."""
    if manifest.tokenizer is None:
        return None
    return TextEncoder(folder / manifest.tokenizer.file, manifest.tokenizer, manifest.signature)


def generation_record(
    spec: GenerationSpec, graph: SignatureSpec, base_dir: Path, artifact_dir: Path
) -> GenerationRecord:
    """At build: check the decoder graph's interface, the tokenizer and the end token; copy the tokenizer."""
    inputs, outputs = {t.name: t for t in graph.inputs}, {t.name: t for t in graph.outputs}
    wanted = {"input_ids": (inputs, 2), "past": (inputs, 5), "logits": (outputs, 3), "present": (outputs, 5)}
    for name, (tensors, rank) in wanted.items():
        if name not in tensors or len(tensors[name].shape) != rank:
            raise ModelLoadError(
                f"model.generation: the graph needs {name!r} of rank {rank} (input_ids [batch, sequence], "
                "past [batch, kv, heads, past_sequence, head_dim] → logits [batch, sequence, vocab], present)"
            )
    source = _tokenizer_file(spec.tokenizer, base_dir)
    tokenizer = load_tokenizer(source)
    eos = None
    if spec.eos_token is not None:
        eos = tokenizer.token_to_id(spec.eos_token)
        if eos is None:
            raise ModelLoadError(f"model.generation.eos_token {spec.eos_token!r} is not in the tokenizer's vocabulary")
    shutil.copyfile(source, artifact_dir / TOKENIZER_FILE)
    return GenerationRecord(tokenizer_file=TOKENIZER_FILE, max_new_tokens=spec.max_new_tokens, context=spec.context,
                            eos_token_id=eos, prefix_cache=spec.prefix_cache)  # fmt: skip
