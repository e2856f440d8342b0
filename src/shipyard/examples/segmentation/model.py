"""A small U-Net: two down steps, a bottleneck, two up steps with skip connections; per-pixel class scores.

The output is channels-last ([batch, 32, 32, classes]) so the class axis is the last one, as the
evaluation's `iou` metric (argmax over the last axis) and clients expect.
"""

from __future__ import annotations

import torch
from torch import nn


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())


class UNet(nn.Module):
    def __init__(self, classes: int = 3, width: int = 16) -> None:
        super().__init__()
        self.down1, self.down2 = _double_conv(1, width), _double_conv(width, 2 * width)
        self.bottom = _double_conv(2 * width, 4 * width)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2), _double_conv(4 * width, 2 * width)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2), _double_conv(2 * width, width)
        self.out = nn.Conv2d(width, classes, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        d1 = self.down1(image)
        d2 = self.down2(self.pool(d1))
        bottom = self.bottom(self.pool(d2))
        u2 = self.dec2(torch.cat([self.up2(bottom), d2], dim=1))
        u1 = self.dec1(torch.cat([self.up1(u2), d1], dim=1))
        return self.out(u1).permute(0, 2, 3, 1)
