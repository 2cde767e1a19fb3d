"""Input normalisation as the first layer of every model.

Models in rnp take images in [0, 1] and normalise them themselves, so attacks, triggers and
defenses all work in pixel space and never need to know a dataset's statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
# The std used by the official RNP code (and much backdoor work), not the exact CIFAR-10 std.
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


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
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = ", ".join(f"{m:.4g}" for m in self.mean.flatten().tolist())
        std = ", ".join(f"{s:.4g}" for s in self.std.flatten().tolist())
        return f"mean=({mean}), std=({std})"
