"""Re-estimating a purified model's BatchNorm statistics on clean images (the benchmark's
recalibration columns): the statistics become the images' own, nothing else changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rnp.bench.cells import _recalibrated
from rnp.bench.recalibration import running_statistics_layers, recalibrated

from helpers import tiny_image_set

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_statistics_become_the_average_over_the_clean_images():
    images = tiny_image_set(n=200, seed=3)
    model = nn.Sequential(nn.BatchNorm2d(3)).eval()  # stale statistics: mean 0, variance 1
    again = recalibrated(model, images, passes=2, augment=False, batch_size=50)
    x = images.images.float() / 255
    layer = again[0]
    assert torch.allclose(layer.running_mean, x.mean((0, 2, 3)), atol=1e-5)
    # each batch's unbiased variance around its own mean, averaged: close to the whole set's
    assert torch.allclose(layer.running_var, x.var((0, 2, 3)), rtol=0.05)
    with torch.no_grad():
        out = again(x)
    assert out.mean((0, 2, 3)).abs().max() < 1e-4  # eval-mode outputs are centred on these images
    assert layer.momentum == 0.1 and not again.training
    assert torch.equal(model[0].running_mean, torch.zeros(3))  # the input model is untouched
    assert torch.equal(layer.weight, model[0].weight)


def test_augmented_passes_are_seeded_and_differ_from_plain_ones():
    images = tiny_image_set(n=100, seed=4)
    model = nn.Sequential(nn.BatchNorm2d(3))
    augmented = recalibrated(model, images, seed=1)[0]
    assert torch.equal(augmented.running_var, recalibrated(model, images, seed=1)[0].running_var)
    assert not torch.equal(augmented.running_var, recalibrated(model, images, seed=2)[0].running_var)
    plain = recalibrated(model, images, augment=False)[0]
    # crops pad with zeros: the augmented mean is lower than the plain one
    assert (augmented.running_mean < plain.running_mean).all()


def test_only_layers_with_running_statistics_count():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten())
    assert running_statistics_layers(model) == []
    record = _recalibrated(model, tiny_image_set(n=8), {}, "cpu")
    assert record == {"status": "not_applicable", "reason": "the model has no BatchNorm running statistics"}
