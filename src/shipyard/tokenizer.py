"""Tokenizers in front of text models and behind language models, where the model runs.

A text model's tokenizer runs after dynamic batching (build-time evaluation, the server's worker threads),
so a batch is padded once, to its longest text. The artifact carries the Hugging Face `tokenizers` file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from shipyard.artifact.manifest import Manifest, TokenizerRecord
from shipyard.errors import ModelLoadError
from shipyard.spec.models import SignatureSpec


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises bare Exceptions for unreadable files
        raise ModelLoadError(f"{path}: not a readable tokenizer.json: {str(exc).splitlines()[0]}") from None


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

    def count(self, texts: list[str]) -> int:
        """Tokens the texts become (after truncation, without padding)."""
        return sum(sum(e.attention_mask) for e in self._tokenizer.encode_batch(texts))

    def apply(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Served feeds (texts under the record's input) → graph feeds."""
        graph_feeds = {name: array for name, array in feeds.items() if name != self.record.input}
        graph_feeds.update(self.encode(feeds[self.record.input]))
        return graph_feeds


def artifact_encoder(folder: Path, manifest: Manifest) -> TextEncoder | None:
    """A registered version's tokenizer, or None for models that take tensors."""
    if manifest.tokenizer is None:
        return None
    return TextEncoder(folder / manifest.tokenizer.file, manifest.tokenizer, manifest.signature)
