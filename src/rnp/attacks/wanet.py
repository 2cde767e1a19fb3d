"""WaNet: an imperceptible backdoor made of a smooth geometric warp of the whole image.

Nguyen and Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021 (arXiv
2102.10369). A random ``k`` x ``k`` x 2 control grid of offsets in [-1, 1], normalised by its mean
absolute value, is upsampled bicubically to the image size; scaled by ``s`` / image size and added
to the identity sampling grid (then times ``grid_rescale`` and clamped to [-1, 1]), it moves every
pixel by a fraction of a pixel and the image is resampled with ``grid_sample``. Defaults are the
paper's CIFAR-10 settings: ``k`` 4, ``s`` 0.5, ``grid_rescale`` 1, poisoning rate 0.1 and
``cross_ratio`` 2 for the "noise mode".

One warping field is drawn from ``warp_seed`` and used for every image, as the paper specifies
(the official RNP code draws a new field per image, a known deviation from WaNet that we do not
copy). On images that are not square, offsets along x are scaled by the width and along y by the
height; the paper only uses square images.

Noise mode: besides the poisoned images, ``cross_ratio`` times as many other training images get
the warp plus a per-image random perturbation of the grid (uniform in [-1, 1] / image size per
coordinate, then clamped) and keep their true labels, so the network learns that only the exact
warp is the trigger. They are the poisoned set's ``cover_indices``. The paper draws these
perturbations afresh for every batch; here they are drawn once from a seeded generator, so the
poisoned training set is a fixed dataset that can be recorded and inspected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from rnp.attacks.base import Attack, require_float, require_int, seeded_draw
from rnp.data.images import ImageSet, to_uint8
from rnp.data.poisoned import PoisonedSet
from rnp.errors import RnpError
from rnp.utils import generator_for

CHUNK = 1024  # images warped at a time; fixed so that the seeded noise does not depend on memory


@dataclass(eq=False)
class WaNet(Attack):
    """Warps every triggered image with one fixed smooth field; noise-mode images keep their labels."""

    name: ClassVar[str] = "wanet"
    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0
    warp_seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.k = require_int("k", self.k)
        self.s = require_float("s", self.s)
        self.grid_rescale = require_float("grid_rescale", self.grid_rescale)
        self.cross_ratio = require_float("cross_ratio", self.cross_ratio)
        self.warp_seed = require_int("warp_seed", self.warp_seed)
        if self.k < 1:
            raise RnpError(f"WaNet control grid size k must be at least 1, got {self.k}")
        if self.s < 0:
            raise RnpError(f"WaNet warping strength s must not be negative, got {self.s}")
        if self.grid_rescale <= 0:
            raise RnpError(f"WaNet grid_rescale must be positive, got {self.grid_rescale}")
        if self.cross_ratio < 0:
            raise RnpError(f"WaNet cross_ratio must not be negative, got {self.cross_ratio}")

    def control_offsets(self) -> torch.Tensor:
        """The ``(2, k, k)`` random offsets (x, y) in [-1, 1], normalised by their mean magnitude."""
        noise = torch.rand(2, self.k, self.k, generator=generator_for(self.warp_seed, "wanet-warp")) * 2 - 1
        return noise / noise.abs().mean()

    def warp_grid(self, height: int, width: int) -> torch.Tensor:
        """The ``(H, W, 2)`` sampling grid of the trigger, in ``grid_sample``'s (x, y) order."""
        if height < 2 or width < 2:
            raise RnpError(f"WaNet needs images of at least 2x2 pixels, got {height}x{width}")
        offsets = F.interpolate(self.control_offsets()[None], size=(height, width), mode="bicubic",
                                align_corners=True)[0].permute(1, 2, 0)
        scale = torch.tensor([self.s / width, self.s / height])
        return ((identity_grid(height, width) + scale * offsets) * self.grid_rescale).clamp(-1, 1)

    def describe_poisoning(self) -> str:
        return f"{100 * self.poison_rate:g}% (+{100 * self.cross_ratio * self.poison_rate:g}% noise)"

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.warp_grid(*images.shape[-2:]).to(images)
        return warp(images, grid.expand(len(images), -1, -1, -1))

    def noisy_trigger_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """The noise-mode images: the warp with a seeded random perturbation per image, as uint8."""
        height, width = images.shape[-2:]
        grid = self.warp_grid(height, width)
        scale = torch.tensor([1 / width, 1 / height])
        generator = generator_for(self.seed, "wanet-noise-grids")
        chunks = []
        for start in range(0, len(images), CHUNK):
            batch = images[start:start + CHUNK].float() / 255
            noise = torch.rand(len(batch), height, width, 2, generator=generator) * 2 - 1
            chunks.append(to_uint8(warp(batch, (grid + noise * scale).clamp(-1, 1))))
        return torch.cat(chunks) if chunks else images.clone()

    def select_cover_indices(self, train: ImageSet, poisoned: torch.Tensor) -> torch.Tensor:
        """A seeded draw of ``cross_ratio`` times as many images as poisoned, none of them poisoned."""
        count = round(self.cross_ratio * len(poisoned))
        free = torch.ones(len(train), dtype=torch.bool)
        free[poisoned] = False
        candidates = free.nonzero().squeeze(1)
        if count > len(candidates):
            raise RnpError(f"WaNet noise mode asks for {count} images besides the {len(poisoned)} "
                           f"poisoned ones, but the training set has only {len(candidates)} others")
        return seeded_draw(candidates, count, generator_for(self.seed, "wanet-cover-indices"))

    def poison(self, train: ImageSet) -> PoisonedSet:
        """Warps and relabels the poisoned images, and warps with noise the cover images."""
        self._check_target(train.num_classes)
        index = self.select_poison_indices(train)
        cover = self.select_cover_indices(train, index)
        images, labels = train.images.clone(), train.labels.clone()
        images[index] = self.trigger_uint8(train.images[index])
        labels[index] = self.attack_labels(train.labels[index], train.num_classes)
        images[cover] = self.noisy_trigger_uint8(train.images[cover])
        return PoisonedSet(train.with_images(images, labels), index, cover)


def identity_grid(height: int, width: int) -> torch.Tensor:
    """The ``(H, W, 2)`` grid that makes ``grid_sample(align_corners=True)`` return its input."""
    rows = torch.linspace(-1, 1, height)[:, None].expand(height, width)
    cols = torch.linspace(-1, 1, width)[None, :].expand(height, width)
    return torch.stack((cols, rows), dim=-1)


def warp(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resamples float images ``(N, C, H, W)`` bilinearly at ``grid`` ``(N, H, W, 2)``."""
    out = F.grid_sample(images, grid.to(images), mode="bilinear", padding_mode="border", align_corners=True)
    return out.clamp(0, 1)
