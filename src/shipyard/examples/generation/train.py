"""Train the byte-level BPE tokenizer and the decoder on logbook.txt; write the held-out evaluation set.

Run: python train.py   (writes tokenizer.json, weights.safetensors, heldout.npz; about 2 minutes on 2 CPU cores)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from model import TinyGPT  # noqa: E402

VOCAB, WINDOW, HELD_OUT_DAYS = 384, 96, 20


def entries() -> list[str]:
    """One log entry per line, each ended by <eos> so the model learns where an entry stops."""
    return [f"{line}<eos>" for line in (HERE / "logbook.txt").read_text().splitlines() if line]


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def windows(ids: np.ndarray, width: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    starts = np.arange(0, len(ids) - width - 1, step)
    return np.stack([ids[s : s + width] for s in starts]), np.stack([ids[s + 1 : s + width + 1] for s in starts])


def main(steps: int = 700) -> None:
    start = time.perf_counter()
    texts = entries()
    train_texts, held_out = texts[:-HELD_OUT_DAYS], texts[-HELD_OUT_DAYS:]
    tokenizer = train_tokenizer(train_texts)
    tokenizer.save(str(HERE / "tokenizer.json"))
    encode = lambda items: np.array([i for t in items for i in tokenizer.encode(t).ids])  # noqa: E731
    x, y = (torch.from_numpy(a) for a in windows(encode(train_texts), WINDOW, 8))
    torch.manual_seed(0)
    model = TinyGPT(vocab=tokenizer.get_vocab_size())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (32,))
        logits, _ = model(x[batch], model.empty_cache(32))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[batch].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    test_x, test_y = windows(encode(held_out), 64, 32)
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(test_x), model.empty_cache(len(test_x)))
    accuracy = float((logits.argmax(-1).numpy() == test_y).mean())
    save_file(model.state_dict(), str(HERE / "weights.safetensors"))
    past = model.empty_cache(len(test_x)).numpy()
    np.savez(HERE / "heldout.npz", input_ids=test_x, past=past, next_ids=test_y)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"trained {parameters:,} parameters for {steps} steps in {time.perf_counter() - start:.0f}s; "
          f"final loss {loss.item():.3f}; held-out next-token accuracy {accuracy:.4f} "
          f"({len(test_x)} windows)")  # fmt: skip


if __name__ == "__main__":
    main()
