"""ResNet-18, CIFAR variant: the architecture of the official RNP code.

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), with the 7x7 stem and
max-pool of the ImageNet model replaced by a single 3x3 convolution for 32x32 inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rnp.models.normalize import Normalize, channel_statistics


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, then ReLU.

    When the block changes the shape (stride or channels), the shortcut is a 1x1 convolution
    and BN; otherwise it is the identity (an empty ``nn.Sequential``).
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18: a 3x3 stem with BN and ReLU, four stages of two :class:`BasicBlock`, a
    linear head.

    ``width`` is the stem's channel count (64 in the paper); stages use 1x, 2x, 4x and 8x it.
    Adaptive pooling makes the model accept any input size.
    """

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        channels = [max(1, c * width // 64) for c in (64, 128, 256, 512)]
        self.normalize = Normalize(*channel_statistics(in_channels, mean, std))
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(channels[0], channels[0], stride=1)
        self.layer2 = self._make_stage(channels[0], channels[1], stride=2)
        self.layer3 = self._make_stage(channels[1], channels[2], stride=2)
        self.layer4 = self._make_stage(channels[2], channels[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels[3], num_classes)

    @staticmethod
    def _make_stage(in_channels: int, channels: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_channels, channels, stride),
                             BasicBlock(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        return self.linear(torch.flatten(x, 1))
