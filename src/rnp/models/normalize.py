"""Input normalisation as the first layer of every model.

Models in rnp take images in [0, 1] and normalise them themselves, so attacks, triggers and
defenses all work in pixel space and never need to know a dataset's statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rnp.errors import RnpError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
# The std used by the official RNP code (and much backdoor work), not the exact CIFAR-10 std.
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
# One-channel (grayscale) images: the average of the three CIFAR-10 values above. It is not the
# exact statistic of any dataset, only a neutral default of the right scale, as CIFAR-10's own
# values are for RGB data that is not CIFAR-10.
GRAY_MEAN = (sum(CIFAR10_MEAN) / 3,)
GRAY_STD = (sum(CIFAR10_STD) / 3,)
_DEFAULTS = {1: (GRAY_MEAN, GRAY_STD), 3: (CIFAR10_MEAN, CIFAR10_STD)}


def channel_statistics(in_channels: int, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None) -> tuple[Sequence[float], Sequence[float]]:
    """``mean`` and ``std``, or where not given the defaults for ``in_channels``: CIFAR-10's for
    3 channels, their average for 1 (grayscale); other channel counts must give both."""
    if in_channels not in _DEFAULTS and (mean is None or std is None):
        raise RnpError(f"give mean and std for {in_channels}-channel images; defaults exist "
                       "for 1 (grayscale) and 3 (RGB) channels only")
    default_mean, default_std = _DEFAULTS.get(in_channels, (None, None))
    return (default_mean if mean is None else mean, default_std if std is None else std)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` for images ``(N, C, H, W)``.

    ``mean`` and ``std`` are non-persistent buffers: they follow the module across devices and
    dtypes but stay out of the state dict, which then holds only the architecture's own weights.
    They are part of the model's spec instead (see :func:`rnp.models.model_spec`).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalises ``x``; images whose channel count differs from the statistics' are refused
        (one value for all channels excepted), as broadcasting would turn grayscale images into
        three identical channels without a word."""
        channels = self.mean.shape[1]
        if channels != 1 and x.shape[1] != channels:
            raise RnpError(f"the model takes {channels}-channel images but got images of "
                           f"shape {tuple(x.shape[1:])}")
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = ", ".join(f"{m:.4g}" for m in self.mean.flatten().tolist())
        std = ", ".join(f"{s:.4g}" for s in self.std.flatten().tolist())
        return f"mean=({mean}), std=({std})"
