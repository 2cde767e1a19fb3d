"""PreAct-ResNet-18 for CIFAR-size images.

He et al., "Identity Mappings in Deep Residual Networks" (ECCV 2016): each residual block
applies BN and ReLU *before* its convolutions, so the shortcut path carries the identity
untouched from block to block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rnp.models.normalize import Normalize, channel_statistics


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut.

    When the block changes the shape (stride or channels), the shortcut is a 1x1 convolution
    applied to the pre-activated input, as in the paper's reference code; otherwise it is the
    identity on the raw input.
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + identity


class PreActResNet18(nn.Module):
    """PreAct-ResNet-18: a 3x3 stem, four stages of two :class:`PreActBlock`, a linear head.

    The stem is a bare convolution (the first block pre-activates it) with no max-pool, as
    befits 32x32 inputs. After the last stage comes a final BN + ReLU before pooling: the
    paper's blocks end on a convolution, so without it the pooled features would be
    un-normalised. This is the variant used by BackdoorBench and most backdoor benchmarks.

    ``width`` is the stem's channel count (64 in the paper); stages use 1x, 2x, 4x and 8x it.
    Adaptive pooling makes the model accept any input size.
    """

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        channels = [max(1, c * width // 64) for c in (64, 128, 256, 512)]
        self.normalize = Normalize(*channel_statistics(in_channels, mean, std))
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False)
        self.layer1 = self._make_stage(channels[0], channels[0], stride=1)
        self.layer2 = self._make_stage(channels[0], channels[1], stride=2)
        self.layer3 = self._make_stage(channels[1], channels[2], stride=2)
        self.layer4 = self._make_stage(channels[2], channels[3], stride=2)
        self.bn = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels[3], num_classes)

    @staticmethod
    def _make_stage(in_channels: int, channels: int, stride: int) -> nn.Sequential:
        return nn.Sequential(PreActBlock(in_channels, channels, stride),
                             PreActBlock(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.normalize(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(self.relu(self.bn(x)))
        return self.linear(torch.flatten(x, 1))
