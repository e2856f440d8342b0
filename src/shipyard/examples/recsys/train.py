"""Train the recommender on the generated interactions (softmax over all items); report recall@10.

Run: python train.py   (writes weights.safetensors next to this file; a few seconds)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from data import interactions, test_set  # noqa: E402
from model import Recommender  # noqa: E402


def main(epochs: int = 30) -> None:
    users, items, _ = interactions()
    users_t, items_t = torch.from_numpy(users), torch.from_numpy(items)
    torch.manual_seed(0)
    model = Recommender()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2, weight_decay=1e-5)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(users_t))
        for i in range(0, len(order), 512):
            batch = order[i : i + 512]
            scores, _ = model(users_t[batch].unsqueeze(1))
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(scores, items_t[batch]).backward()
            optimizer.step()
    model.seen[users_t, items_t] = 1.0  # recommendations skip what each user already has
    model.eval()
    user_ids, held_out = test_set()
    with torch.no_grad():
        _, top = model(torch.from_numpy(user_ids))
    recall = (top.numpy() == held_out[:, None]).any(axis=1).mean()
    save_file(model.state_dict(), str(HERE / "weights.safetensors"))
    print(f"trained {epochs} epochs in {time.perf_counter() - start:.1f}s; held-out recall@10 {recall:.3f}")


if __name__ == "__main__":
    main()
