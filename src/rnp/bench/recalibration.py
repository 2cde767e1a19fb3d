"""Whether a purified model stays purified once its BatchNorm statistics are re-estimated.

A pruning defense zeroes channels but keeps every BatchNorm layer's running mean and variance,
which were estimated on the poisoned training set with those channels alive. A user who
recalibrates the delivered model on clean images (after quantising it, moving it to another
input pipeline, or before fine-tuning it) replaces them. :func:`recalibrated` is that user's
step, so the benchmark can report the attack success rate after it beside the re-tuning attack
of :mod:`rnp.bench.retuning`.

The statistics are estimated on the images as the model was trained on them: shuffled, with
random crop and flip, over several passes. On the width-16 BadNets subject, with nothing pruned
(82.0% clean accuracy on 2,000 test images), one pass over the 500 clean images in their stored
order (batches of alike images) cost 6.3 points, one shuffled plain pass 2.3, and shuffled
augmented passes 0.2 (one) and 0.0-0.3 (five, by seed).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from rnp.data.images import ImageSet
from rnp.data.loader import iterate_batches
from rnp.utils import generator_for, model_device


def running_statistics_layers(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers that keep running statistics (whether or not they have an
    affine scale; :func:`rnp.defenses.masks.batchnorm_layers` lists the scales RNP masks)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def recalibrated(model: nn.Module, images: ImageSet, *, passes: int = 5, augment: bool = True,
                 batch_size: int = 100, seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are the plain average over
    ``passes`` passes through ``images`` in batches of ``batch_size`` (shuffled and, with
    ``augment``, randomly cropped and flipped, from a generator seeded by ``seed``); every
    weight is kept. ``model`` is untouched."""
    model = copy.deepcopy(model)
    layers = running_statistics_layers(model)
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the batches
    generator = generator_for(seed, "recalibration")
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            for batch, _ in iterate_batches(images, batch_size, shuffle=True, augment=augment,
                                            generator=generator, device=model_device(model)):
                model(batch)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    return model.eval()
