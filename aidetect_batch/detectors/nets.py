"""Detector networks that torchvision does not provide."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """The CIFAKE study's small detector: 4 conv blocks and 2 fully connected layers on 32×32 input."""

    def __init__(self, num_logits: int = 1, input_size: int = 32) -> None:
        super().__init__()
        widths = (3, 32, 64, 128, 128)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths, widths[1:], strict=False):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = max(input_size // 16, 1)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(widths[-1] * side * side, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(256, num_logits),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
