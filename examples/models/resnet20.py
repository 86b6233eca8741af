"""CIFAR ResNet-20 (He et al., "Deep Residual Learning for Image Recognition", 2016, section 4.2),
written from the paper's description so that the pretrained checkpoints published by
akamaster/pytorch_resnet_cifar10 (BSD-2-Clause), e.g. resnet20-12fca82f.th, load with their own key
names (after bdclean strips their 'module.' prefix).

An example of bringing your own architecture:

    bdclean evaluate ../shared/data/checkpoints/resnet20-12fca82f.th \
        --arch examples/models/resnet20.py:resnet20 --data ../shared/data/cifar10 \
        --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225

Layout: 3x3 conv (16 channels) + BN + ReLU, then three stages of three basic blocks with 16, 32
and 64 channels (the 2nd and 3rd stages halve the resolution in their first block), global average
pooling and a Linear head `linear`. Shortcuts are the paper's option A (parameter-free): where the
shape changes, the input is subsampled with stride 2 and its channels are zero-padded, so the
checkpoint holds no shortcut weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Two 3x3 conv + BN layers around an identity (or option-A) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes  # extra channels the shortcut must supply as zeros
        self.stride = stride

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.pad // 2  # zeros split evenly before and after the existing channels
        return F.pad(x, (0, 0, 0, 0, half, self.pad - half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, blocks_per_stage: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes = 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(Block(planes, width, stride=2 if i > 0 and j == 0 else 1))
                planes = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():  # He initialisation, as in the paper
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-20 for 32x32 images (0.27M parameters)."""
    return ResNet20(num_classes, in_channels)
