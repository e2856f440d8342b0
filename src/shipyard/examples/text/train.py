"""Export MiniLM for semantic search, train an intent classifier head on its embeddings, write the eval sets.

Run: python train.py   (writes tokenizer.json, embed.onnx, intent.onnx, search_eval.npz, intent_test.npz;
about a minute on 2 CPU cores; no network)
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from encoder import SentenceEncoder, export, minilm_folder, tokenize  # noqa: E402

LABELS = ["alarm", "music", "shopping", "weather"]  # the column order of intent.onnx's probabilities


def intents() -> tuple[list[str], np.ndarray]:
    rows = [line.split("\t") for line in (HERE / "intents.tsv").read_text().splitlines() if line]
    return [text for _, text in rows], np.array([LABELS.index(label) for label, _ in rows])


def split(labels: np.ndarray, test_share: float = 1 / 3) -> tuple[np.ndarray, np.ndarray]:
    """A stratified, seeded split: the same third of each intent is held out on every run."""
    rng = np.random.default_rng(0)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: int(test_share * (labels == c).sum())]
                           for c in range(len(LABELS))])  # fmt: skip
    return np.setdiff1d(np.arange(len(labels)), test), np.sort(test)


def embed(model: SentenceEncoder, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**tokenize(texts[i : i + 32])) for i in range(0, len(texts), 32)])


def train_head(embeddings: torch.Tensor, labels: torch.Tensor, epochs: int = 300) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(embeddings.shape[1], len(LABELS))
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(epochs):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(embeddings * 10), labels).backward()  # x10: unit vectors are small
        optimizer.step()
    scaled = torch.nn.Linear(embeddings.shape[1], len(LABELS))
    with torch.no_grad():  # fold the x10 into the weights, so the exported head is one plain Linear
        scaled.weight.copy_(head.weight * 10)
        scaled.bias.copy_(head.bias)
    return scaled


def main() -> None:
    start = time.perf_counter()
    shutil.copyfile(minilm_folder() / "tokenizer.json", HERE / "tokenizer.json")
    encoder = SentenceEncoder().eval()
    export(encoder, HERE / "embed.onnx", "embedding")
    corpus = (HERE / "corpus.txt").read_text().splitlines()
    texts, labels = intents()
    search_texts = corpus + texts
    np.savez(HERE / "search_eval.npz", text=np.array(search_texts), embedding=embed(encoder, search_texts).numpy())

    train, test = split(labels)
    head = train_head(embed(encoder, [texts[i] for i in train]), torch.from_numpy(labels[train]))
    classifier = SentenceEncoder(head).eval()
    test_texts = [texts[i] for i in test]
    predicted = embed(classifier, test_texts).argmax(1).numpy()
    export(classifier, HERE / "intent.onnx", "probabilities")
    np.savez(HERE / "intent_test.npz", text=np.array(test_texts), label=labels[test])
    print(f"exported embed.onnx ({(HERE / 'embed.onnx').stat().st_size / 1e6:.1f} MB) and intent.onnx; "
          f"{len(search_texts)} texts for the embedding check")  # fmt: skip
    print(f"intent head: {len(train)} training / {len(test)} held-out utterances, held-out accuracy (PyTorch) "
          f"{(predicted == labels[test]).mean():.4f}; {time.perf_counter() - start:.1f}s")  # fmt: skip


if __name__ == "__main__":
    main()
