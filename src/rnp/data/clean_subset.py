"""The defender's clean set: a few hundred labelled images the defender trusts."""

from __future__ import annotations

import torch

from rnp.data.images import ImageSet
from rnp.errors import RnpError
from rnp.utils import generator_for


def select_clean_subset(train: ImageSet, size: int | float = 500, *, seed: int = 0,
                        stratified: bool = False, exclude=None) -> tuple[ImageSet, torch.Tensor]:
    """Draws the defender's clean images from a training split and returns them with their indices.

    ``size`` is a count (``500``, the RNP default of 1% of CIFAR-10) or a fraction in (0, 1).
    ``exclude`` holds indices that must not be drawn: the poisoned training images, so the clean
    set really is clean. With ``stratified`` every class gets an equal share (remainders go to
    the first classes); otherwise the draw is uniform, as in the official code.
    """
    available = torch.ones(len(train), dtype=torch.bool)
    if exclude is not None and len(exclude):
        available[torch.as_tensor(exclude, dtype=torch.long)] = False
    pool = available.nonzero().squeeze(1)
    count = _resolve_size(size, len(train))
    if count > len(pool):
        raise RnpError(f"asked for {count} clean images but only {len(pool)} unpoisoned "
                       "training images exist")
    generator = generator_for(seed, "clean-subset")
    if not stratified:
        chosen = pool[torch.randperm(len(pool), generator=generator)[:count]]
    else:
        chosen = _stratified(pool, train.labels[pool], train.num_classes, count, generator)
    chosen = chosen.sort().values
    return train.subset(chosen), chosen


def _resolve_size(size, total: int) -> int:
    if isinstance(size, float) and 0 < size < 1:
        size = round(size * total)
    if int(size) != size or size < 1:
        raise RnpError(f"clean-set size must be a positive count or a fraction in (0, 1), got {size}")
    return int(size)


def _stratified(pool, labels, num_classes, count, generator) -> torch.Tensor:
    share = [count // num_classes + (c < count % num_classes) for c in range(num_classes)]
    chosen = []
    for cls, want in enumerate(share):
        members = pool[labels == cls]
        if want > len(members):
            raise RnpError(f"class {cls} has only {len(members)} clean images, {want} asked for")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:want]])
    return torch.cat(chosen)
