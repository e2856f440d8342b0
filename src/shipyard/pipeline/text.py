"""At build: check a text model's or language model's tokenizer against its graph and copy it into the artifact.

The tokenizer itself (shipyard.tokenizer) runs where the model runs: here for evaluation, in the server after
batching, and, for language models, to encode prompts and decode generated tokens.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from shipyard.artifact.manifest import GenerationRecord, TokenizerRecord
from shipyard.errors import ModelLoadError
from shipyard.spec.models import GenerationSpec, SignatureSpec, TokenizerSpec, resolve_path
from shipyard.tokenizer import TextEncoder, load_tokenizer

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
