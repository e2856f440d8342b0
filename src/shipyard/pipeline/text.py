"""At build: check a text model's or language model's tokenizer against its graph and copy it into the artifact.

The tokenizer itself (shipyard.tokenizer) runs where the model runs: here for evaluation, in the server after
batching, and, for language models, to encode prompts and decode generated tokens.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from shipyard.artifact.manifest import TokenizerRecord
from shipyard.errors import ModelLoadError
from shipyard.spec.models import SignatureSpec, TokenizerSpec, resolve_path
from shipyard.tokenizer import TextEncoder

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # the names Hugging Face exporters use
TOKENIZER_FILE = "tokenizer.json"


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


def spec_encoder(spec: TokenizerSpec, graph: SignatureSpec, base_dir: Path, artifact_dir: Path) -> TextEncoder:
    """At build: check the tokenizer against the graph and copy its file into the artifact."""
    source = _tokenizer_file(spec.path, base_dir)
    record = tokenizer_record(spec, graph)
    encoder = TextEncoder(source, record, graph)
    shutil.copyfile(source, artifact_dir / record.file)
    return encoder


SAMPLE_TEXTS = (
    "The ship left the harbour at dawn.",
    "A storm passed far to the north, and the crew rationed fresh water for the rest of the week.",
    "Hello!",
    "Shipyard verifies every converted model against the original before it is registered.",
)


def sample_feeds(encoder: TextEncoder, count: int) -> dict[str, np.ndarray]:
    """Token-id feeds for `count` fixed sentences of several lengths: what a text model without evaluation data
    is verified and timed on (random ids would fall outside its embedding tables)."""
    texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(count)]
    return encoder.encode(np.array(texts, dtype=object))
