"""Generated implicit feedback (no download): 600 users, 400 items, each user has taste for 2 of 8 genres.

Every user interacted with 24 items, mostly from their genres; one interaction per user is held out,
and the model is judged on whether that item is in its top 10 for the user (recall@10).
"""

from __future__ import annotations

import numpy as np

USERS, ITEMS, GENRES, PER_USER = 600, 400, 8, 24


def interactions() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item) training pairs and the held-out item of every user."""
    rng = np.random.default_rng(0)
    genre_of_item = rng.integers(GENRES, size=ITEMS)
    users, items, held_out = [], [], []
    for user in range(USERS):
        liked = rng.choice(GENRES, size=2, replace=False)
        weights = np.where(np.isin(genre_of_item, liked), 1.0, 0.05)
        chosen = rng.choice(ITEMS, size=PER_USER, replace=False, p=weights / weights.sum())
        held_out.append(chosen[0])
        users += [user] * (PER_USER - 1)
        items += list(chosen[1:])
    return np.asarray(users), np.asarray(items), np.asarray(held_out)


def test_set() -> tuple[np.ndarray, np.ndarray]:
    """Every user id (shape [users, 1]) and its held-out item."""
    _, _, held_out = interactions()
    return np.arange(USERS, dtype=np.int64).reshape(-1, 1), held_out
