"""Generated multi-sensor signals with injected faults (no download): the training and held-out sets.

Four sensors sample a machine's vibration, temperature, current and pressure for 64 steps. About a
third of the windows contain a fault in one sensor: a spike, a slow drift, or a stuck reading.
"""

from __future__ import annotations

import numpy as np

STEPS, SENSORS = 64, 4


def generate(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 4 * np.pi, STEPS)
    phase = rng.uniform(0, 2 * np.pi, (count, 1, SENSORS))
    x = np.sin(t[None, :, None] * (1 + np.arange(SENSORS)) / 2 + phase) + rng.normal(0, 0.2, (count, STEPS, SENSORS))
    y = (rng.random(count) < 0.35).astype(np.int64)
    for i in np.flatnonzero(y):
        sensor, start = rng.integers(SENSORS), rng.integers(8, STEPS - 16)
        kind = rng.integers(3)
        if kind == 0:  # spike
            x[i, start : start + 3, sensor] += rng.choice([-1, 1]) * rng.uniform(2.0, 3.5)
        elif kind == 1:  # drift
            x[i, start:, sensor] += np.linspace(0, rng.uniform(1.5, 3.0), STEPS - start)
        else:  # stuck reading
            x[i, start : start + 16, sensor] = x[i, start, sensor]
    return x.astype(np.float32), y


def train_set() -> tuple[np.ndarray, np.ndarray]:
    return generate(2000, seed=1)


def test_set() -> tuple[np.ndarray, np.ndarray]:
    return generate(600, seed=2)
