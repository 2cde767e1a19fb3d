"""BadNets: a small fixed patch stamped on the image.

Gu, Dolan-Gavitt and Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning Model
Supply Chain", 2017 (arXiv 1708.06733). The default patch is the 3x3 grid of the official RNP
code (``gridTrigger``): rows from the top ``[0, 0, 1], [0, 1, 0], [1, 0, 1]`` in every channel,
in the bottom-right corner of the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rnp.attacks.base import Attack, require_int
from rnp.errors import RnpError

GRID_3X3 = ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 1.0))
PATCHES = ("grid", "white", "black")


@dataclass(eq=False)
class BadNets(Attack):
    """Stamps a ``size`` x ``size`` patch with its top-left corner at ``location`` (row, col).

    ``patch`` is ``"grid"`` (the official 3x3 pattern, scaled up by nearest neighbour for larger
    sizes), ``"white"`` or ``"black"``; ``location`` ``None`` means the bottom-right corner.
    """

    name: ClassVar[str] = "badnets"
    patch: str = "grid"
    size: int = 3
    location: tuple[int, int] | None = None

    def __post_init__(self):
        super().__post_init__()
        self.size = require_int("size", self.size)
        if self.patch not in PATCHES:
            raise RnpError(f"unknown BadNets patch {self.patch!r}; choose one of {', '.join(PATCHES)}")
        if self.size < 1:
            raise RnpError(f"patch size must be at least 1, got {self.size}")
        if self.location is not None:
            if not isinstance(self.location, (tuple, list)) or len(self.location) != 2:
                raise RnpError(f"patch location must be (row, col), got {self.location!r}")
            self.location = tuple(require_int("location", v) for v in self.location)

    def pattern(self) -> torch.Tensor:
        """The patch as a ``(size, size)`` tensor of values in [0, 1]."""
        if self.patch == "white":
            return torch.ones(self.size, self.size)
        if self.patch == "black":
            return torch.zeros(self.size, self.size)
        cells = torch.arange(self.size) * 3 // self.size
        return torch.tensor(GRID_3X3)[cells[:, None], cells[None, :]]

    def trigger_region(self, height: int, width: int) -> tuple[slice, slice]:
        """Rows and columns the patch covers in an image of the given size."""
        if self.size > min(height, width):
            raise RnpError(f"a {self.size}-pixel patch does not fit a {height}x{width} image")
        top, left = self.location if self.location is not None else (height - self.size, width - self.size)
        if not (0 <= top <= height - self.size and 0 <= left <= width - self.size):
            raise RnpError(f"patch at {self.location} does not fit a {height}x{width} image")
        return slice(top, top + self.size), slice(left, left + self.size)

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        rows, cols = self.trigger_region(*images.shape[-2:])
        out = images.clone()
        out[..., rows, cols] = self.pattern().to(images)
        return out
