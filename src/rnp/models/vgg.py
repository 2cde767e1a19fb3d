"""VGG-16 for CIFAR-size images, with or without batch normalisation.

Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition"
(ICLR 2015). For 32x32 inputs the three large fully connected layers of the ImageNet model are
replaced by global average pooling and one linear layer, as is usual on CIFAR.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rnp.models.normalize import Normalize, channel_statistics

# Output channels of each 3x3 convolution; "M" is a 2x2 max-pool.
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")


class VGG(nn.Module):
    """A VGG network: stacks of conv3x3-(BN)-ReLU separated by max-pools, global average
    pooling, a linear classifier.

    ``batch_norm=False`` gives the plain network, needed to study defenses on models without
    BN layers. ``width`` scales every channel count by ``width / 64`` (64 = the paper's size).
    The max-pools round up (``ceil_mode``), which changes nothing for even sizes such as 32x32
    but lets inputs down to 1x1 survive all five of them.
    """

    def __init__(self, config: Sequence[int | str] = VGG16_CONFIG, num_classes: int = 10,
                 width: int = 64, batch_norm: bool = True, in_channels: int = 3,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        self.normalize = Normalize(*channel_statistics(in_channels, mean, std))
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            out_channels = max(1, item * width // 64)
            layers.append(nn.Conv2d(channels, out_channels, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """He initialisation of the convolutions (He et al., ICCV 2015), zero biases.

        PyTorch's default initialisation is too small for 13 stacked convolutions without BN:
        measured here, plain VGG-16 then never leaves chance accuracy on CIFAR-10 or on the
        synthetic test images. Torchvision's VGG uses the same rule.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(self.normalize(x)))
        return self.classifier(torch.flatten(x, 1))
