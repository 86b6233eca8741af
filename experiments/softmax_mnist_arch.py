"""A small MNIST CNN whose forward ends in a softmax, in the two forms third-party code uses (issue 21).

Both factories build the same layers (same state-dict keys), so one trained checkpoint loads into either:
- `module_softmax`: a trailing `nn.Softmax` module (bdclean can reach its input: 'normaliser-input');
- `functional_softmax`: `F.softmax` in forward (only the probabilities are reachable: 'log-of-output').
`logits` is the same network without the softmax, the twin the other two are compared with.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class DigitCNN(nn.Module):
    """conv 16 - pool - conv 32 - pool - fc 64 - fc classes; returns logits."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def features(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x):
        return self.fc2(self.features(x))


class ModuleSoftmax(DigitCNN):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__(num_classes, in_channels)
        self.out = nn.Softmax(dim=1)

    def forward(self, x):
        return self.out(super().forward(x))


class FunctionalSoftmax(DigitCNN):
    def forward(self, x):
        return F.softmax(super().forward(x), dim=1)


def logits(num_classes: int = 10, in_channels: int = 1):
    return DigitCNN(num_classes, in_channels)


def module_softmax(num_classes: int = 10, in_channels: int = 1):
    return ModuleSoftmax(num_classes, in_channels)


def functional_softmax(num_classes: int = 10, in_channels: int = 1):
    return FunctionalSoftmax(num_classes, in_channels)
