"""Matrix factorisation for top-k retrieval: user and item embeddings, scores by dot product.

`scores` ranks every item for the user (the evaluation reads it); `top_items` are the 10 best item ids,
computed inside the graph (ONNX TopK), which is what a client of the served model usually wants. Items
the user has already interacted with (the `seen` buffer, saved with the weights) are ranked last: a
recommender suggests new things.
"""

from __future__ import annotations

import torch
from torch import nn


class Recommender(nn.Module):
    def __init__(self, users: int = 600, items: int = 400, dim: int = 32, k: int = 10) -> None:
        super().__init__()
        self.users = nn.Embedding(users, dim)
        self.items = nn.Embedding(items, dim)
        self.k = k
        self.register_buffer("seen", torch.zeros(users, items))

    def forward(self, user: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = user[:, 0]
        scores = self.users(ids) @ self.items.weight.T - 1e4 * self.seen[ids]
        return scores, torch.topk(scores, self.k, dim=1).indices
