"""ImageSet and conversions, batch iteration with augmentation, and the defender's clean subset."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import tiny_image_set
from rnp.data.clean_subset import select_clean_subset
from rnp.data.images import ImageSet, as_image_set, to_uint8
from rnp.data.loader import iterate_batches, random_crop_flip
from rnp.errors import RnpError


def indexed_image_set(n: int = 20, num_classes: int = 4, size: int = 8) -> ImageSet:
    """Image ``i`` is filled with the value ``i``, so each batch says which images it holds."""
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, size, size).clone()
    return ImageSet(images, torch.arange(n) % num_classes, tuple("abcd"[:num_classes]))


def batch_indices(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0] * 255).round().long().tolist()


# --- ImageSet --------------------------------------------------------------------------------

def test_image_set_basic_access():
    data = tiny_image_set(n=6, num_classes=3, size=8)
    assert len(data) == 6 and data.num_classes == 3 and data.image_shape == (3, 8, 8)
    image, label = data[4]
    assert image.dtype == torch.float32 and label == 1
    assert torch.equal(image, data.images[4].float() / 255)
    sub = data.subset([5, 0])
    assert torch.equal(sub.images, data.images[[5, 0]]) and sub.labels.tolist() == [2, 0]


@pytest.mark.parametrize("images, labels, classes", [
    (torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]), ("a", "b")),                    # float pixels
    (torch.zeros(2, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ("a", "b")),    # 3 dims
    (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 1]), ("a", "b")),  # count
    (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), ("a", "b")),  # too high
    (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([-1, 0]), ("a", "b")),  # negative
])
def test_image_set_rejects_invalid_input(images, labels, classes):
    with pytest.raises(RnpError):
        ImageSet(images, labels, classes)


def test_to_uint8_rounds_and_clamps():
    values = torch.tensor([-0.2, 0.0, 0.2, 0.5, 1.0, 1.3])
    assert to_uint8(values).tolist() == [0, 0, 51, 128, 255, 255]
    assert to_uint8(values).dtype == torch.uint8


# --- as_image_set ----------------------------------------------------------------------------

def test_as_image_set_from_float_pair_is_lossless_for_8_bit_values():
    pixels = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    data = as_image_set((pixels.float() / 255, [2, 0, 1, 2, 0]))
    assert torch.equal(data.images, pixels)
    assert data.labels.tolist() == [2, 0, 1, 2, 0]
    assert data.classes == ("0", "1", "2")


def test_as_image_set_from_uint8_tensors_keeps_pixels_and_classes():
    pixels = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    data = as_image_set((pixels, torch.tensor([1, 0, 1, 1])), classes=["no", "yes"])
    assert torch.equal(data.images, pixels) and data.classes == ("no", "yes")
    assert data.labels.dtype == torch.long


def test_as_image_set_returns_an_image_set_unchanged():
    data = tiny_image_set()
    assert as_image_set(data) is data


def test_as_image_set_from_torchvision_cifar_layout():
    array = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    dataset = SimpleNamespace(data=array, targets=[0, 1, 2, 0, 1, 2], classes=["x", "y", "z"])
    data = as_image_set(dataset)
    assert data.image_shape == (3, 8, 8)
    assert torch.equal(data.images, torch.from_numpy(array).permute(0, 3, 1, 2))
    assert data.labels.tolist() == [0, 1, 2, 0, 1, 2] and data.classes == ("x", "y", "z")


def test_as_image_set_from_list_of_pil_images():
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(5)]
    items = [(Image.fromarray(a), i % 2) for i, a in enumerate(arrays)]
    data = as_image_set(items)
    assert len(data) == 5 and data.image_shape == (3, 8, 8)
    for i, a in enumerate(arrays):
        assert torch.equal(data.images[i], torch.from_numpy(a).permute(2, 0, 1))
    assert data.labels.tolist() == [0, 1, 0, 1, 0]


def test_as_image_set_from_grayscale_pil_images():
    arrays = [np.full((8, 8), v, dtype=np.uint8) for v in (10, 200, 90)]
    data = as_image_set([(Image.fromarray(a, mode="L"), 0) for a in arrays])
    assert data.image_shape == (1, 8, 8)
    assert data.images[:, 0, 0, 0].tolist() == [10, 200, 90]


def test_as_image_set_from_a_two_item_dataset_of_pairs():
    # Two (image, label) pairs must not be mistaken for a pair (images, labels).
    arrays = [np.full((8, 8, 3), v, dtype=np.uint8) for v in (30, 60)]
    data = as_image_set([(Image.fromarray(arrays[0]), 1), (Image.fromarray(arrays[1]), 0)])
    assert len(data) == 2 and data.labels.tolist() == [1, 0]
    assert data.images[:, 0, 0, 0].tolist() == [30, 60]


def test_as_image_set_from_dataset_of_float_tensors():
    class Tensors(torch.utils.data.Dataset):
        classes = ["p", "q"]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.full((3, 4, 4), i / 255 * 100), i % 2

    data = as_image_set(Tensors())
    assert data.images[:, 0, 0, 0].tolist() == [0, 100, 200] and data.classes == ("p", "q")


def test_as_image_set_rejects_normalised_floats():
    images = (torch.rand(4, 3, 8, 8) - 0.5) / 0.25  # what a Normalize transform produces
    with pytest.raises(RnpError, match=r"\[0, 1\]"):
        as_image_set((images, torch.tensor([0, 1, 0, 1])))


def test_as_image_set_rejects_unusable_objects():
    with pytest.raises(RnpError):
        as_image_set(42)
    with pytest.raises(RnpError):
        as_image_set((torch.rand(3, 8, 8), torch.tensor([0, 1, 2])))  # missing a dimension


# --- random_crop_flip ------------------------------------------------------------------------

def test_random_crop_flip_keeps_shape_and_dtype():
    images = torch.rand(7, 3, 8, 8)
    out = random_crop_flip(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype


def test_random_crop_flip_is_deterministic_for_a_generator():
    images = torch.rand(16, 3, 8, 8)
    first = random_crop_flip(images, torch.Generator().manual_seed(3))
    second = random_crop_flip(images, torch.Generator().manual_seed(3))
    other = random_crop_flip(images, torch.Generator().manual_seed(4))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_random_crop_flip_without_padding_only_mirrors():
    images = torch.rand(32, 3, 8, 8)
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=0)
    same = [torch.equal(o, x) for o, x in zip(out, images)]
    mirrored = [torch.equal(o, x.flip(-1)) for o, x in zip(out, images)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert any(same) and any(mirrored)


def test_random_crop_flip_output_is_a_window_of_the_padded_image():
    padding, size = 2, 6
    images = torch.rand(12, 3, size, size) + 0.5  # never zero, so padding is recognisable
    out = random_crop_flip(images, torch.Generator().manual_seed(1), padding=padding)
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    shifted = False
    for o, p in zip(out, padded):
        windows = [p[:, t:t + size, left:left + size] for t in range(2 * padding + 1)
                   for left in range(2 * padding + 1)]
        assert any(torch.equal(o, w) or torch.equal(o, w.flip(-1)) for w in windows)
        shifted |= bool((o == 0).any())
    assert shifted  # some crop really moved the image and brought in zero padding


# --- iterate_batches -------------------------------------------------------------------------

def test_iterate_batches_without_shuffle_keeps_order():
    data = indexed_image_set(n=10)
    batches = list(iterate_batches(data, 4))
    assert [len(labels) for _, labels in batches] == [4, 4, 2]
    assert sum((batch_indices(images) for images, _ in batches), []) == list(range(10))


def test_iterate_batches_shuffle_visits_each_index_once():
    data = indexed_image_set(n=23)
    seen = []
    for images, labels in iterate_batches(data, 5, shuffle=True,
                                          generator=torch.Generator().manual_seed(0)):
        assert images.dtype == torch.float32
        assert images.min() >= 0 and images.max() <= 1
        index = batch_indices(images)
        assert labels.tolist() == data.labels[index].tolist()
        seen += index
    assert sorted(seen) == list(range(23))
    assert seen != list(range(23))


def test_iterate_batches_float_values_match_pixels():
    data = tiny_image_set(n=9)
    images, labels = next(iter(iterate_batches(data, 9)))
    assert torch.equal(images, data.images.float() / 255)
    assert torch.equal(labels, data.labels)


@pytest.mark.parametrize("augment", [False, True])
def test_iterate_batches_repeat_with_a_seeded_generator(augment):
    data = tiny_image_set(n=20)

    def run(seed):
        return list(iterate_batches(data, 6, shuffle=True, augment=augment,
                                    generator=torch.Generator().manual_seed(seed)))

    first, second, other = run(5), run(5), run(6)
    assert len(first) == len(second) == 4
    for (a_images, a_labels), (b_images, b_labels) in zip(first, second):
        assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(first, other))


# --- select_clean_subset ---------------------------------------------------------------------

def test_clean_subset_count():
    train = tiny_image_set(n=40, num_classes=4)
    subset, index = select_clean_subset(train, 10, seed=0)
    assert len(subset) == 10 and len(set(index.tolist())) == 10
    assert index.tolist() == sorted(index.tolist())
    assert torch.equal(subset.images, train.images[index])
    assert torch.equal(subset.labels, train.labels[index])
    assert subset.classes == train.classes


def test_clean_subset_fraction():
    train = tiny_image_set(n=40)
    subset, index = select_clean_subset(train, 0.25, seed=0)
    assert len(subset) == len(index) == 10


def test_clean_subset_never_draws_excluded_indices():
    train = tiny_image_set(n=40)
    poisoned = torch.arange(0, 40, 3)  # 14 poisoned images
    for seed in range(5):
        _, index = select_clean_subset(train, 20, seed=seed, exclude=poisoned)
        assert not set(index.tolist()) & set(poisoned.tolist())
    _, index = select_clean_subset(train, 26, seed=0, exclude=poisoned)
    assert index.tolist() == [i for i in range(40) if i % 3]  # every clean image, no other


def test_clean_subset_stratified_gives_equal_class_counts():
    train = tiny_image_set(n=60, num_classes=3)
    labels = torch.cat([torch.zeros(30), torch.ones(20), torch.full((10,), 2)]).long()
    train = train.with_images(train.images, labels)  # unbalanced classes
    subset, index = select_clean_subset(train, 9, seed=1, stratified=True, exclude=[0, 1, 2])
    assert torch.bincount(subset.labels, minlength=3).tolist() == [3, 3, 3]
    assert not {0, 1, 2} & set(index.tolist())


def test_clean_subset_seed_repeats_and_different_seeds_differ():
    train = tiny_image_set(n=50)
    _, first = select_clean_subset(train, 10, seed=7)
    _, again = select_clean_subset(train, 10, seed=7)
    _, other = select_clean_subset(train, 10, seed=8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("size, exclude, stratified", [
    (41, None, False),                       # more than the training set
    (30, list(range(15)), False),            # more than the unpoisoned images
    (9, list(range(0, 40, 4)), True),        # class 0 of 4 has no clean image left
    (0, None, False),                        # not a positive count
])
def test_clean_subset_rejects_impossible_requests(size, exclude, stratified):
    train = tiny_image_set(n=40, num_classes=4)
    with pytest.raises(RnpError):
        select_clean_subset(train, size, exclude=exclude, stratified=stratified)
