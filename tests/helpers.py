"""Tiny synthetic data and models shared by the unit tests."""

from __future__ import annotations

import torch
from torch import nn

from rnp.data.images import ImageSet


def tiny_image_set(n: int = 24, num_classes: int = 3, size: int = 8, channels: int = 3,
                   seed: int = 0) -> ImageSet:
    """Random uint8 images with labels cycling through the classes (equal counts per class)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.arange(n) % num_classes
    return ImageSet(images, labels, tuple(f"class{i}" for i in range(num_classes)))


def separable_image_set(n: int = 32, num_classes: int = 2, size: int = 8, seed: int = 0) -> ImageSet:
    """Images whose class is written in their brightness: class c is about 40 + 170 c / (K - 1)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    base = 40 + 170 * labels.float() / max(num_classes - 1, 1)
    noise = torch.randint(-20, 21, (n, 3, size, size), generator=generator).float()
    images = (base[:, None, None, None] + noise).clamp(0, 255).to(torch.uint8)
    return ImageSet(images, labels, tuple(str(i) for i in range(num_classes)))


def tiny_cnn(num_classes: int = 2, width: int = 4, seed: int = 0, batch_norm: bool = False) -> nn.Module:
    """A small convolutional classifier for [0, 1] images, deterministic for a seed."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width) if batch_norm else nn.Identity(),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )
