"""Train a small Llama chat model from scratch on logbook.txt and save it as a Hugging Face folder.

The model is transformers' own LlamaForCausalLM (a small config) with a byte-level BPE tokenizer trained
here by `tokenizers`, saved with `save_pretrained` together with a chat template: the same layout a real
Llama, Qwen or Phi download has, so shipyard.yaml works unchanged on one of those.

Each log entry becomes two conversations ("What does the log say for day N?", "Where was the ship headed
on day N?"); the last 20 days are held out (heldout.txt) for the perplexity guard.

Run: python train.py   (writes model/ and heldout.txt; a few minutes on 2 CPU cores)
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
HELD_OUT_DAYS, VOCAB, WINDOW = 20, 1024, 128
SPECIAL = ["<|endoftext|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
SYSTEM = "You are the ship's logkeeper."
# The chat template is Jinja, as in every Hugging Face chat model; the server renders it the same way.
TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def conversations(entry: str) -> list[list[dict[str, str]]]:
    day, text = entry.split(": ", 1)
    number = day.split()[1]
    route = re.search(r"from (\w+) toward (\w+)", text)
    question = f"What does the log say for day {number}?"
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
              {"role": "assistant", "content": entry}]]  # fmt: skip
    if route:
        answer = f"On day {number} we sailed from {route[1]} toward {route[2]}."
        chats.append([{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": f"Where was the ship headed on day {number}?"},
                      {"role": "assistant", "content": answer}])  # fmt: skip
    return chats


def render(tokenizer: PreTrainedTokenizerFast, chat: list[dict[str, str]]) -> str:
    return str(tokenizer.apply_chat_template(chat, tokenize=False))


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|end|>",
                                   pad_token="<|endoftext|>")  # fmt: skip
    fast.chat_template = TEMPLATE
    return fast


def main(steps: int = 600) -> None:
    start = time.perf_counter()
    entries = [line for line in (HERE / "logbook.txt").read_text().splitlines() if line]
    train_entries, held_out = entries[:-HELD_OUT_DAYS], entries[-HELD_OUT_DAYS:]
    tokenizer = train_tokenizer(entries)
    train_texts = [render(tokenizer, c) for e in train_entries for c in conversations(e)]
    held_texts = [render(tokenizer, c) for e in held_out for c in conversations(e)]
    (HERE / "heldout.txt").write_text("".join(held_texts))  # one conversation turn per line

    stream = [i for text in train_texts for i in tokenizer(text)["input_ids"]]
    data = torch.tensor(stream)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        offsets = torch.randint(0, len(data) - WINDOW - 1, (16,))
        batch = torch.stack([data[o : o + WINDOW] for o in offsets])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}", flush=True)
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)  # fmt: skip
    model.save_pretrained(HERE / "model")
    tokenizer.save_pretrained(HERE / "model")
    parameters = sum(p.numel() for p in model.parameters())
    print(f"trained a {parameters:,}-parameter Llama for {steps} steps in {time.perf_counter() - start:.0f}s; "
          f"final loss {loss.item():.3f}; wrote model/ (save_pretrained) and heldout.txt "
          f"({len(held_texts)} held-out conversations)")  # fmt: skip


if __name__ == "__main__":
    main()
