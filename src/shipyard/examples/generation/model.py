"""A small decoder-only transformer whose key/value cache is an input and an output.

forward(input_ids [B, T], past [B, 2 * layers, heads, P, head_dim]) → (logits [B, T, vocab],
present [B, 2 * layers, heads, P + T, head_dim]). With P = 0 it reads a whole prompt; after that the
server feeds one token and the previous `present`, so no position is computed twice.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(
        self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, steps, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(dim, dim=-1)
        q, k, v = (t.reshape(batch, steps, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        total = k.shape[2]
        # Query i sits at position total - steps + i and may see keys 0 … that position.
        visible = torch.ones(steps, total, dtype=torch.bool).tril(diagonal=total - steps)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        attended = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, steps, dim))
        return x + self.mlp(self.norm2(x)), k, v


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 384, dim: int = 96, heads: int = 4, layers: int = 2, context: int = 256) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor, past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = past.shape[3]
        positions = torch.arange(start, start + input_ids.shape[1])
        x = self.embed(input_ids) + self.position(positions)
        present = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, past[:, 2 * i], past[:, 2 * i + 1])
            present += [k, v]
        return self.head(self.norm(x)), torch.stack(present, dim=1)

    def empty_cache(self, batch: int = 1) -> torch.Tensor:
        block = self.blocks[0]
        return torch.zeros(batch, 2 * len(self.blocks), block.heads, 0, block.head_dim)
