"""The example architectures used by the shipped checkpoints (``landscape_data.models``).

Both take the digits images ``(n, 1, 8, 8)`` and return 10 logits. They are ``nn.Module``
classes, so a checkpoint's manifest may name them and ``landscape scan`` builds them without
flags.
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten, then ``depth`` hidden ReLU layers of width ``width``, then a linear head."""

    def __init__(self, in_features: int = 64, width: int = 64, depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3x3 conv + BatchNorm + ReLU blocks, 2x2 max-pool, then a linear head."""

    def __init__(self, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * c * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))
