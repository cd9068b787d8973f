"""A small residual CNN for the offline quickstart on 8x8 digit images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QuickstartCNN", "quickstart_cnn"]


class QuickstartCNN(nn.Module):
    """Stem conv, one residual block, a strided conv, global pooling and a linear head.

    Small enough (about 10K parameters at ``width=16``) that a dense Fisher of it still fits
    in memory, which lets tests compare M-FAC against an exact reference on a real network.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        h = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(h)))
        x = F.relu(self.bn3(self.down(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def quickstart_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> QuickstartCNN:
    """The quickstart CNN for (in_channels, 8, 8) inputs (works for any size >= 2x2)."""
    return QuickstartCNN(num_classes, in_channels, width)
