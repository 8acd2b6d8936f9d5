"""The textbook CNN classifier: conv -> pool -> conv -> pool -> dense -> dense."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import segfast.nn as snn
from segfast.models._layers import BACKENDS


class SimpleCNN(nn.Module):
    """Conv2D(32, 3x3, ReLU) -> MaxPool(2) -> Conv2D(64, 3x3, ReLU) -> MaxPool(2) -> Flatten ->
    Dense(64, ReLU) -> Dense(num_classes), returning logits (softmax lives in the loss).

    ``backend="segfast"`` uses ``Conv2dAct``/``LinearAct``/``MaxPool2d`` (activation fused);
    ``backend="torch"`` the stock layers with ``F.relu``. Parameter names are the same
    (``conv1``, ``conv2``, ``fc1``, ``fc2``), so a state_dict loads in either.

    Input: (N, in_channels, image_size, image_size) float; output: (N, num_classes).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, backend: str = "segfast"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"SimpleCNN: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        side = ((image_size - 2) // 2 - 2) // 2  # two valid 3x3 convolutions, two 2x2 pools
        if side < 1:
            raise ValueError(f"SimpleCNN: image_size must be at least 10, got {image_size}")
        self.backend = backend
        fused = backend == "segfast"
        conv = snn.Conv2dAct if fused else nn.Conv2d
        linear = snn.LinearAct if fused else nn.Linear
        self.conv1 = conv(in_channels, 32, 3)
        self.conv2 = conv(32, 64, 3)
        self.pool = snn.MaxPool2d(2) if fused else nn.MaxPool2d(2)
        self.fc1 = linear(64 * side * side, 64)
        self.fc2 = snn.LinearAct(64, num_classes, activation="none") if fused else nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = (lambda t: t) if self.backend == "segfast" else F.relu  # segfast layers apply it themselves
        x = self.pool(act(self.conv1(x)))
        x = self.pool(act(self.conv2(x)))
        return self.fc2(act(self.fc1(x.flatten(1))))
