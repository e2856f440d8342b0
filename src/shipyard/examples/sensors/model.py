"""An LSTM that reads a 64-step window of 4 sensors and scores fault / no fault.

The LSTM reads each signal next to its step-to-step change and a flag for an exact repeat (a stuck sensor
is a run of them; measurement noise never repeats a value), and the head looks at the mean and the
maximum of its states over time, so a short fault early in the window counts as much as one at the end.
"""

from __future__ import annotations

import torch
from torch import nn


class FaultLSTM(nn.Module):
    def __init__(self, sensors: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3 * sensors, hidden, batch_first=True)
        self.head = nn.Linear(2 * hidden, 2)

    def forward(self, signals: torch.Tensor) -> torch.Tensor:
        change = torch.diff(signals, dim=1, prepend=signals[:, :1])
        stuck = (change == 0).to(signals.dtype)  # exact repeats: noise never gives them, a stuck sensor does
        states, _ = self.lstm(torch.cat([signals, change, stuck], dim=2))
        return self.head(torch.cat([states.mean(dim=1), states.amax(dim=1)], dim=1))
