"""Generated 32x32 grey images with discs and squares on a noisy background, and their pixel masks.

Classes: 0 background, 1 disc, 2 square. Seeded, so the held-out set is the same on every run.
"""

from __future__ import annotations

import numpy as np

SIZE = 32


def make(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images [count, 1, 32, 32] float32, masks [count, 32, 32] int64)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:SIZE, :SIZE]
    images = rng.normal(0.2, 0.15, (count, 1, SIZE, SIZE)).astype(np.float32)
    masks = np.zeros((count, SIZE, SIZE), dtype=np.int64)
    for i in range(count):
        for _ in range(rng.integers(1, 4)):
            kind, radius = rng.integers(1, 3), rng.integers(3, 8)
            cy, cx = rng.integers(radius, SIZE - radius, size=2)
            if kind == 1:
                inside = (rows - cy) ** 2 + (cols - cx) ** 2 <= radius**2
            else:
                inside = (np.abs(rows - cy) <= radius) & (np.abs(cols - cx) <= radius)
            masks[i][inside] = kind
            images[i, 0][inside] = rng.uniform(0.6, 1.0) + rng.normal(0, 0.1, inside.sum())
    return images, masks


def train_set() -> tuple[np.ndarray, np.ndarray]:
    return make(1200, seed=0)


def test_set() -> tuple[np.ndarray, np.ndarray]:
    return make(300, seed=1)
