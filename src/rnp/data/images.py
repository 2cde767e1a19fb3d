"""In-memory image sets: uint8 pixels decoded once, labels, class names.

Every dataset in rnp (train, test, the defender's clean set, a poisoned or triggered set) is an
:class:`ImageSet`. Pixels stay uint8 in ``(N, C, H, W)`` layout, a quarter of the memory of
float32, and become floats in [0, 1] one batch at a time. Models take [0, 1] images and hold
their own input normalisation, so triggers and defenses all work in pixel space.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from rnp.errors import RnpError


@dataclass(frozen=True, eq=False)
class ImageSet(Dataset):
    """Images ``(N, C, H, W)`` uint8 with integer labels ``(N,)`` and class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise RnpError(f"images must be a uint8 tensor (N, C, H, W), got {self.images.dtype} "
                           f"of shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise RnpError(f"{self.images.shape[0]} images but labels of shape "
                           f"{tuple(self.labels.shape)}")
        if len(self.labels) and (int(self.labels.min()) < 0
                                 or int(self.labels.max()) >= len(self.classes)):
            raise RnpError(f"labels must lie in [0, {len(self.classes) - 1}] "
                           f"for {len(self.classes)} classes")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index):
        return self.images[index].float() / 255, int(self.labels[index])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, indices) -> "ImageSet":
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(self.images[indices], self.labels[indices], self.classes)

    def with_images(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> "ImageSet":
        """A set with the same classes and new pixels (and labels)."""
        return ImageSet(images, self.labels if labels is None else labels, self.classes)

    @classmethod
    def from_numpy(cls, images: np.ndarray, labels, classes) -> "ImageSet":
        """Builds a set from ``(N, H, W, C)`` uint8 arrays, the layout image files decode to."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.dtype != np.uint8 or images.ndim != 4:
            raise RnpError(f"expected uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        return cls(tensor, torch.as_tensor(np.asarray(labels), dtype=torch.long),
                   tuple(str(c) for c in classes))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Quantises float images in [0, 1] to uint8, as saving them to an image file would."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def as_image_set(data, classes=None) -> ImageSet:
    """Converts what a user may hold into an :class:`ImageSet`.

    Accepted: an ImageSet; a pair ``(images, labels)`` whose images are one tensor or array
    ``(N, C, H, W)`` or a list of ``(C, H, W)`` tensors or arrays (channels first) or PIL images,
    float in [0, 1] or uint8; a torchvision-style dataset with ``data`` and ``targets``
    attributes; or any map-style dataset of ``(image, label)`` pairs whose images are PIL images,
    uint8 arrays or [0, 1] tensors (without normalisation: the model does that). A path is
    refused: which of its images are the clean ones is the caller's choice (see the message).
    """
    if isinstance(data, ImageSet):
        return data
    if isinstance(data, (str, os.PathLike)):
        raise RnpError(f"{os.fspath(data)!r} is a path, not image data: load it with "
                       "rnp.data.load_dataset(path) and pick the clean images with "
                       "rnp.data.select_clean_subset(data.train, 500)")
    if _is_pair(data):
        images = data[0] if _is_array(data[0]) else _stack([_pair_image(i) for i in data[0]])
        images, labels = (d if torch.is_tensor(d) else torch.as_tensor(np.asarray(d))
                          for d in (images, data[1]))
        return _from_tensors(images, labels, classes)
    if hasattr(data, "data") and hasattr(data, "targets"):
        array = np.asarray(data.data)
        names = classes or getattr(data, "classes", None)
        if array.dtype == np.uint8 and array.ndim in (3, 4):
            labels = np.asarray(data.targets)
            return ImageSet.from_numpy(array, labels, names or _default_classes(labels))
    if isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        try:
            items = [data[i] for i in range(len(data))]
            pairs = [(item[0], int(item[1])) for item in items]
        except Exception as error:
            raise RnpError(f"could not read the dataset as (image, label) pairs: {error}") from error
        if not pairs:
            raise RnpError("the dataset is empty")
        images = _stack([_item_to_tensor(image) for image, _ in pairs])
        labels = torch.as_tensor([label for _, label in pairs])
        return _from_tensors(images, labels, classes or getattr(data, "classes", None))
    raise RnpError(f"cannot use {type(data).__name__} as image data: give an ImageSet, "
                   "a pair (images, labels) or a dataset of (image, label) pairs")


def _is_array(value) -> bool:
    return torch.is_tensor(value) or isinstance(value, np.ndarray)


def _is_pair(data) -> bool:
    """Whether ``data`` is ``(images, labels)``: images one array, or a non-empty list of images;
    labels anything but a single number (``(image, label)`` is one item, not a set)."""
    if not isinstance(data, (tuple, list)) or len(data) != 2 or isinstance(data[1], (int, np.integer)):
        return False
    images = data[0]
    return _is_array(images) or (isinstance(images, (tuple, list)) and len(images) > 0 and all(
        _is_array(image) or isinstance(image, Image.Image) for image in images))


def _pair_image(image) -> torch.Tensor:
    """One image of an ``(images, labels)`` list: tensors and arrays are channels first already,
    PIL images are converted."""
    return _item_to_tensor(image) if isinstance(image, Image.Image) else torch.as_tensor(image)


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    """One ``(N, C, H, W)`` tensor of same-shaped ``(C, H, W)`` images; RnpError if shapes differ."""
    shapes = sorted({tuple(image.shape) for image in images})
    if len(shapes) > 1:
        raise RnpError(f"the images differ in shape ({', '.join(map(str, shapes[:3]))}"
                       f"{', ...' if len(shapes) > 3 else ''}); all must have one shape")
    return torch.stack(images)


def _item_to_tensor(image) -> torch.Tensor:
    if torch.is_tensor(image):
        return image
    array = np.array(image)
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _from_tensors(images: torch.Tensor, labels: torch.Tensor, classes) -> ImageSet:
    if images.dim() != 4:
        raise RnpError(f"images must have 4 dimensions (N, C, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = images.float()
        bad = int((~torch.isfinite(images)).sum())
        if bad:
            raise RnpError(f"the images hold {bad} non-finite pixel values (NaN or infinity); "
                           "float images must lie in [0, 1]")
        low, high = (float(images.min()), float(images.max())) if images.numel() else (0.0, 1.0)
        if low < -1e-4 or high > 1 + 1e-4:
            raise RnpError(f"float images must lie in [0, 1] (found [{low:.3g}, {high:.3g}]); "
                           "pass them before normalisation, the model normalises its input")
        images = to_uint8(images)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    return ImageSet(images.contiguous(), labels, tuple(classes or _default_classes(labels.numpy())))


def _default_classes(labels) -> tuple[str, ...]:
    count = int(np.max(labels)) + 1 if len(labels) else 0
    return tuple(str(i) for i in range(count))
