"""Blend: the whole image is mixed with a fixed pattern.

Chen, Liu, Li, Lu and Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning", 2017 (arXiv 1712.05526), blended injection: ``x' = (1 - alpha) x + alpha p`` with
alpha 0.2 as in the RNP code. The default pattern is uniform random noise drawn from
``pattern_seed``, one fixed pattern for every image; a user image can be given instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rnp.attacks.base import Attack, require_float, require_int
from rnp.errors import RnpError
from rnp.utils import generator_for


@dataclass(eq=False)
class Blend(Attack):
    """Blends every poisoned image with ``pattern`` (or seeded noise) at opacity ``alpha``."""

    name: ClassVar[str] = "blend"
    alpha: float = 0.2
    pattern_seed: int = 0
    pattern: torch.Tensor | None = None

    def __post_init__(self):
        super().__post_init__()
        self.alpha = require_float("alpha", self.alpha)
        self.pattern_seed = require_int("pattern_seed", self.pattern_seed)
        if not 0 < self.alpha <= 1:
            raise RnpError(f"blend alpha must lie in (0, 1], got {self.alpha}")
        if self.pattern is not None:
            self.pattern = torch.as_tensor(self.pattern, dtype=torch.float32)
            if self.pattern.dim() != 3 or self.pattern.min() < 0 or self.pattern.max() > 1:
                raise RnpError("a blend pattern must be a (C, H, W) image with values in [0, 1]")

    def pattern_for(self, shape: torch.Size) -> torch.Tensor:
        """The ``(C, H, W)`` pattern for images of this shape, the user's one resized if needed."""
        channels, height, width = shape[-3:]
        if self.pattern is None:
            generator = generator_for(self.pattern_seed, "blend-pattern")
            return torch.rand(channels, height, width, generator=generator)
        pattern = self.pattern
        if pattern.shape[-2:] != (height, width):
            pattern = torch.nn.functional.interpolate(pattern[None], size=(height, width),
                                                      mode="bilinear", align_corners=False)[0]
        if pattern.shape[0] != channels:
            pattern = pattern.mean(0, keepdim=True).expand(channels, -1, -1)
        return pattern.clamp(0, 1)

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        pattern = self.pattern_for(images.shape).to(images)
        return (1 - self.alpha) * images + self.alpha * pattern
