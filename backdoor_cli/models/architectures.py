"""The built-in architectures, written from their published descriptions.

Their state_dict key names are chosen to match the checkpoints that backdoor research code saves, so
those checkpoints load strictly without any renaming:
- `resnet18`: the CIFAR ResNet-18 of the FST reference code (3x3 stem, no max-pool, head `linear`).
- `preactresnet18`: BackdoorBench's PreActResNet-18 (no final BN before pooling, head `linear`).
- `vgg16_bn`: the common CIFAR VGG-16 with BN (`features` + a single Linear `classifier`).
- `resnet20/32/44/56`: He et al.'s CIFAR ResNets with option-A shortcuts, as in the widely used
  akamaster/pytorch_resnet_cifar10 checkpoints (strong subjects that train on a CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BN; a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            # Keys shortcut.0 (conv) and shortcut.1 (bn), as in the published CIFAR checkpoints.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stride-1 stem and no max-pool, so 32x32 inputs keep detail."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, planes = (64, 128, 256, 512), 64
        for i, (width, count) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(count):
                stage.append(BasicBlock(planes, width, stride=2 if i > 0 and j == 0 else 1))
                planes = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        # Adaptive pooling instead of the usual avg_pool2d(4): same result at 32x32, any size works.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016b): BN-ReLU before each conv; the shortcut is a bare
    1x1 conv applied to the pre-activated input when the shape changes (key shortcut.0)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))
            if stride != 1 or in_planes != planes
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """BackdoorBench's PreActResNet: stem conv only (no stem BN), and no final BN-ReLU before the
    pooling; reproducing that exactly is what makes its checkpoints load and behave the same."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        widths, planes = (64, 128, 256, 512), 64
        for i, (width, count) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(count):
                stage.append(PreActBlock(planes, width, stride=2 if i > 0 and j == 0 else 1))
                planes = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class CifarVGG(nn.Module):
    """The common CIFAR VGG-BN: `features` = [Conv3x3(bias)-BN-ReLU]* with 2x2 max-pools (indices
    0, 1, 2 per conv block, one per pool, as in the widely used pytorch-cifar layout), global
    average pooling, and one Linear `classifier` (512 -> classes) instead of ImageNet's three.
    The pools use ceil_mode so inputs smaller than 32x32 (e.g. 28x28) still work; for power-of-two
    sizes ceil_mode changes nothing."""

    def __init__(self, layout: tuple, num_classes: int, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class OptionABlock(nn.Module):
    """He et al.'s CIFAR basic block: two 3x3 conv + BN around a parameter-free shortcut (option A:
    where the shape changes, the input is subsampled by the stride and zero-padded in channels)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.extra = stride, planes - in_planes

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.extra == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        before = self.extra // 2  # the zeros go half before, half after the existing channels
        return F.pad(x, (0, 0, 0, 0, before, self.extra - before))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self._shortcut(x))


class CifarResNetA(nn.Module):
    """The CIFAR ResNets of He et al. 2016, section 4.2 (depth 6n+2: 16/32/64 channels, n blocks per
    stage, option-A shortcuts). Key names (conv1, bn1, layerK.I.*, linear) are those of the widely
    used akamaster/pytorch_resnet_cifar10 checkpoints, so they load strictly once 'module.' is stripped."""

    def __init__(self, blocks_per_stage: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes = 16
        for i, width in enumerate((16, 32, 64)):
            stage = []
            for j in range(blocks_per_stage):
                stage.append(OptionABlock(planes, width, stride=2 if i > 0 and j == 0 else 1))
                planes = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():  # He initialisation, as in the paper
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    # No conv bias: the BN right after it has its own shift.
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SimpleCNN(nn.Module):
    """A small VGG-style net (5 convs, ~0.28M parameters) that trains on CIFAR-10 on a laptop CPU.

    Layout: conv32 | pool | conv64 conv64 | pool | conv128 conv128 | global avg pool | Linear `fc`.
    Pooling right after the first (narrow) conv keeps every wide conv at 1/4 or 1/16 of the pixels:
    on a 2-core CPU this was 2.2x faster per batch than pooling after a second full-resolution conv,
    and no less accurate in a short training run. Global pooling makes any input size work."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, w),
            nn.MaxPool2d(2, ceil_mode=True),
            _conv_bn_relu(w, 2 * w),
            _conv_bn_relu(2 * w, 2 * w),
            nn.MaxPool2d(2, ceil_mode=True),
            _conv_bn_relu(2 * w, 4 * w),
            _conv_bn_relu(4 * w, 4 * w),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class TinyNet(nn.Module):
    """Minuscule (one 4-channel conv, BN, global pooling, Linear `fc`): for unit tests only."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(F.relu(self.bn(self.conv(x)))), 1))


def resnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    """CIFAR ResNet-18 (FST reference code's key names)."""
    return CifarResNet((2, 2, 2, 2), num_classes, in_channels)


def preactresnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    """BackdoorBench's PreActResNet-18."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels)


def vgg16_bn(num_classes: int, in_channels: int = 3) -> nn.Module:
    """CIFAR VGG-16 with batch norm and a single Linear classifier."""
    return CifarVGG(VGG16_LAYOUT, num_classes, in_channels)


def simple_cnn(num_classes: int, in_channels: int = 3) -> nn.Module:
    """Small fast CPU model for demos and experiments."""
    return SimpleCNN(num_classes, in_channels)


def simple_cnn_half(num_classes: int, in_channels: int = 3) -> nn.Module:
    """simple_cnn at half the channels (16-32-64, ~71k parameters): 3.3x faster per training step on a
    2-core CPU (112 ms against 371 ms per batch of 128), for experiment grids that must fit in an hour."""
    return SimpleCNN(num_classes, in_channels, width=16)


def resnet20(num_classes: int, in_channels: int = 3) -> nn.Module:
    """CIFAR ResNet-20 (0.27M parameters; akamaster key names)."""
    return CifarResNetA(3, num_classes, in_channels)


def resnet32(num_classes: int, in_channels: int = 3) -> nn.Module:
    """CIFAR ResNet-32 (0.46M parameters; akamaster key names)."""
    return CifarResNetA(5, num_classes, in_channels)


def resnet44(num_classes: int, in_channels: int = 3) -> nn.Module:
    """CIFAR ResNet-44 (0.66M parameters; akamaster key names)."""
    return CifarResNetA(7, num_classes, in_channels)


def resnet56(num_classes: int, in_channels: int = 3) -> nn.Module:
    """CIFAR ResNet-56 (0.85M parameters; akamaster key names)."""
    return CifarResNetA(9, num_classes, in_channels)


def test_tiny(num_classes: int, in_channels: int = 3) -> nn.Module:
    """Minuscule model for unit tests."""
    return TinyNet(num_classes, in_channels)


test_tiny.__test__ = False  # not a pytest test, despite its name

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "preactresnet18": preactresnet18,
    "vgg16_bn": vgg16_bn,
    "simple_cnn": simple_cnn,
    "simple_cnn_half": simple_cnn_half,
    "test_tiny": test_tiny,
}
