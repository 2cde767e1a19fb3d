"""Tiny synthetic data and models shared by the unit tests.

Every seed these helpers use passes through :func:`fixture_seed`, so a seed sweep
(``pytest --fixture-seed N``, or ``RNP_FIXTURE_SEED=N``) draws other images, other poisoned
samples and other initial weights everywhere at once, while seed 0 keeps the usual fixtures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from rnp.attacks import BadNets
from rnp.data import select_clean_subset
from rnp.data.images import ImageSet
from rnp.data.poisoned import PoisonedSet, TriggeredSet
from rnp.models import build_model
from rnp.training import TrainConfig, train


FIXTURE_SEED_VARIABLE = "RNP_FIXTURE_SEED"


def fixture_seed(seed: int = 0) -> int:
    """``seed`` shifted by the sweep's fixture seed (0 unless a sweep asks for another): the
    seed every fixture generator takes, so that one number reseeds the whole suite."""
    return seed + 1000 * int(os.environ.get(FIXTURE_SEED_VARIABLE, "0"))


def tiny_image_set(n: int = 24, num_classes: int = 3, size: int = 8, channels: int = 3,
                   seed: int = 0) -> ImageSet:
    """Random uint8 images with labels cycling through the classes (equal counts per class)."""
    generator = torch.Generator().manual_seed(fixture_seed(seed))
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.arange(n) % num_classes
    return ImageSet(images, labels, tuple(f"class{i}" for i in range(num_classes)))


def separable_image_set(n: int = 32, num_classes: int = 2, size: int = 8, seed: int = 0) -> ImageSet:
    """Images whose class is written in their brightness: class c is about 40 + 170 c / (K - 1)."""
    generator = torch.Generator().manual_seed(fixture_seed(seed))
    labels = torch.arange(n) % num_classes
    base = 40 + 170 * labels.float() / max(num_classes - 1, 1)
    noise = torch.randint(-20, 21, (n, 3, size, size), generator=generator).float()
    images = (base[:, None, None, None] + noise).clamp(0, 255).to(torch.uint8)
    return ImageSet(images, labels, tuple(str(i) for i in range(num_classes)))


def tiny_cnn(num_classes: int = 2, width: int = 4, seed: int = 0, batch_norm: bool = False) -> nn.Module:
    """A small convolutional classifier for [0, 1] images, deterministic for a seed."""
    torch.manual_seed(fixture_seed(seed))
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width) if batch_norm else nn.Identity(),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )


def assert_only_channels_zeroed(original: dict, purified: dict, zeroed: set) -> None:
    """``purified`` equals the ``original`` state dict except that the weight rows of the
    ``(layer, channel)`` pairs in ``zeroed`` are exactly 0."""
    for name, tensor in purified.items():
        layer, _, field = name.rpartition(".")
        if field == "weight" and any(layer == z[0] for z in zeroed):
            for channel in range(len(tensor)):
                expected = 0.0 if (layer, channel) in zeroed else original[name][channel]
                assert bool((tensor[channel] == expected).all()), (name, channel)
        else:
            assert torch.equal(tensor, original[name]), name


def smooth_images(n: int, num_classes: int = 10, size: int = 16, seed: int = 0) -> ImageSet:
    """Class c is a fixed smooth colour layout; each image adds its own smooth noise.

    A 3x3 checkerboard trigger is then the only high-frequency content, so a network learns
    it in channels of its own, as it does on natural images (see test_end_to_end.py).
    """
    def upsample(t):
        return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)

    templates = upsample(torch.rand(num_classes, 3, 3, 3,
                                    generator=torch.Generator().manual_seed(fixture_seed(123))))
    generator = torch.Generator().manual_seed(fixture_seed(seed))
    labels = torch.arange(n) % num_classes
    images = 0.6 * templates[labels] + 0.4 * upsample(torch.rand(n, 3, 4, 4, generator=generator))
    return ImageSet((images * 255).round().to(torch.uint8), labels, tuple(map(str, range(num_classes))))


@dataclass(frozen=True, eq=False)
class SyntheticBackdoor:
    """A BadNets-backdoored tiny PreAct-ResNet18 (target 0) with the defender's clean images,
    the test sets to measure a defense on, and the poisoned training set it learned from."""

    model: nn.Module
    clean: ImageSet
    test: ImageSet
    triggered: TriggeredSet
    poisoned: PoisonedSet
    target: int = 0


def make_synthetic_backdoor() -> SyntheticBackdoor:
    """Trains the backdoored model on 1,000 smooth 16x16 images (10% poisoned), single-threaded
    and seeded, so every test session gets the same model (about 10 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_set, test_set = smooth_images(1000, seed=0), smooth_images(400, seed=1)
        attack = BadNets(target=0, poison_rate=0.1, seed=fixture_seed(0))
        poisoned = attack.poison(train_set)
        torch.manual_seed(fixture_seed(0))
        model = build_model("preact_resnet18", num_classes=10, width=8)
        train(model, poisoned.data, TrainConfig(epochs=20, lr=0.05, augment=False), progress=False)
        clean, _ = select_clean_subset(train_set, 200, seed=fixture_seed(0),
                                       exclude=poisoned.poisoned_indices)
        return SyntheticBackdoor(model.eval(), clean, test_set, attack.triggered_test(test_set), poisoned)
    finally:
        torch.set_num_threads(threads)


def make_synthetic_clean_model() -> nn.Module:
    """A clean tiny PreAct-ResNet18 on the same images as :func:`make_synthetic_backdoor` (no
    trigger), the negative case of the detection tests (about 6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(fixture_seed(1))
        model = build_model("preact_resnet18", num_classes=10, width=8)
        train(model, smooth_images(1000, seed=0), TrainConfig(epochs=10, lr=0.05, augment=False),
              progress=False)
        return model.eval()
    finally:
        torch.set_num_threads(threads)


def write_dataset(root: Path, classes: int, n_train: int = 40, n_test: int = 20,
                  channels: int = 3) -> Path:
    """An image-folder tree ``train/<class>/*.png``, ``test/<class>/*.png`` of 16x16 images,
    RGB or (``channels=1``) grayscale, brighter by class."""
    rng = np.random.default_rng(fixture_seed(classes))
    for split, count in (("train", n_train), ("test", n_test)):
        for index in range(count):
            label = index % classes
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 64, (16, 16, 3) if channels == 3 else (16, 16)) + 60 * label
            Image.fromarray(pixels.astype(np.uint8), mode="RGB" if channels == 3 else "L").save(
                folder / f"{index:03d}.png")
    return root
