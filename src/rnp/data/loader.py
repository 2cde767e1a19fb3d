"""Batches of float images from an :class:`ImageSet`, augmented on tensors.

Augmentation is the CIFAR recipe of the RNP code (random crop with 4 pixels of zero padding,
then a random horizontal flip), applied to a whole batch at once with tensor indexing, so no
image is ever decoded or converted one at a time.
"""

from __future__ import annotations

from typing import Iterator

import torch

from rnp.data.images import ImageSet
from rnp.utils import generator_for


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Randomly crops each image of a ``(N, C, H, W)`` batch after zero padding, then flips half."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = top[:, None] + torch.arange(h)
    cols = left[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def iterate_batches(data: ImageSet, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                    generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields ``(images, labels)`` batches, images float in [0, 1] on ``device``.

    ``generator`` drives the shuffling and the augmentation, so a seeded generator makes the
    whole stream of batches repeatable.
    """
    if (shuffle or augment) and generator is None:
        generator = generator_for(0, "batches")
    order = torch.randperm(len(data), generator=generator) if shuffle else torch.arange(len(data))
    for start in range(0, len(data), batch_size):
        index = order[start:start + batch_size]
        images = data.images[index].float().div_(255)
        if augment:
            images = random_crop_flip(images, generator)
        yield images.to(device, non_blocking=True), data.labels[index].to(device, non_blocking=True)
