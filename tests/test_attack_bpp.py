"""BppAttack: requantisation trigger, exact Floyd-Steinberg dithering, poisoning, PGD negatives."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import separable_image_set, tiny_cnn, tiny_image_set

from rnp.attacks.bpp import Bpp, BppNegativeHook, floyd_steinberg
from rnp.data.images import ImageSet
from rnp.errors import RnpError
from rnp.training.loop import run_epoch


def reference_dither(image: list[list[float]], levels: int) -> list[list[float]]:
    """Textbook Floyd-Steinberg on one channel (a list of rows of values in [0, 1]), pixel by pixel."""
    steps = levels - 1
    work = [[value * steps for value in row] for row in image]
    height, width = len(work), len(work[0])
    for y in range(height):
        for x in range(width):
            old = work[y][x]
            new = min(max(round(old), 0), steps)
            work[y][x] = new
            error = old - new
            if x + 1 < width:
                work[y][x + 1] += error * 7 / 16
            if y + 1 < height and x - 1 >= 0:
                work[y + 1][x - 1] += error * 3 / 16
            if y + 1 < height:
                work[y + 1][x] += error * 5 / 16
            if y + 1 < height and x + 1 < width:
                work[y + 1][x + 1] += error * 1 / 16
    return [[value / steps for value in row] for row in work]


def on_grid(values: torch.Tensor, levels: int) -> bool:
    scaled = values.double() * (levels - 1)
    return bool(((scaled - scaled.round()).abs() < 1e-5).all())


def flat_set(n: int = 2, size: int = 32, value: int = 100) -> ImageSet:
    return ImageSet(torch.full((n, 3, size, size), value, dtype=torch.uint8), torch.arange(n) % 2, ("a", "b"))


# --- trigger ---------------------------------------------------------------------------------

@pytest.mark.parametrize("levels", [2, 8, 32])
def test_without_dithering_every_value_is_the_nearest_grid_level(levels):
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = Bpp(squeeze_num=levels, dithering=False).apply_trigger(images)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert on_grid(out, levels)
    assert (out - images).abs().max() <= 0.5 / (levels - 1) + 1e-6
    assert len(out.unique()) <= levels


def test_default_trigger_uses_eight_levels_and_uint8_values_are_their_roundings():
    data = tiny_image_set(n=4, size=16, seed=3)
    out = Bpp().trigger_uint8(data.images)
    grid = torch.round(torch.arange(8) * 255 / 7).to(torch.uint8)
    assert set(out.unique().tolist()) <= set(grid.tolist())
    assert not torch.equal(out, data.images)


def test_dithering_keeps_the_mean_of_a_flat_region_and_stays_on_the_grid():
    value = 100 / 255  # between the levels 3/7 and 2/7; plain rounding moves it by 0.036
    images = torch.full((2, 3, 32, 32), value)
    dithered = Bpp().apply_trigger(images)
    plain = Bpp(dithering=False).apply_trigger(images)
    assert on_grid(dithered, 8)
    assert torch.allclose(dithered.unique().double(), torch.tensor([2 / 7, 3 / 7], dtype=torch.float64))
    assert abs(float(dithered.mean()) - value) < 0.003
    assert abs(float(dithered[..., 8:24, 8:24].mean()) - value) < 0.005
    assert abs(float(plain.mean()) - value) > 0.03


def test_dithering_equals_the_plain_reference_on_a_tiny_image():
    generator = torch.Generator().manual_seed(7)
    images = torch.rand(2, 3, 4, 4, generator=generator, dtype=torch.float64)
    images[0, 0, 0, 0], images[0, 1, 3, 3], images[1, 2, 1, 2] = 1.0, 0.0, 0.99  # error past the ends
    for levels in (2, 8):
        out = floyd_steinberg(images, levels)
        expected = torch.tensor([[reference_dither(images[i, c].tolist(), levels) for c in range(3)]
                                 for i in range(2)], dtype=torch.float64)
        assert torch.equal(out, expected)
        assert torch.equal(Bpp(squeeze_num=levels).apply_trigger(images), expected)


def test_dithering_is_independent_per_image_and_channel():
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    batch = floyd_steinberg(images, 8)
    for i in range(3):
        assert torch.equal(batch[i:i + 1], floyd_steinberg(images[i:i + 1], 8))
        for c in range(3):
            assert torch.equal(batch[i, c], floyd_steinberg(images[i:i + 1, c:c + 1], 8)[0, 0])


def test_trigger_does_not_modify_its_input_works_on_any_size_and_is_deterministic():
    images = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(1))
    copy = images.clone()
    first = Bpp().apply_trigger(images)
    assert torch.equal(images, copy)
    assert first.shape == (2, 1, 5, 7) and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, Bpp(seed=9).apply_trigger(images))
    with pytest.raises(RnpError):
        Bpp().apply_trigger(torch.rand(3, 8, 8))


# --- poisoning and triggered test set --------------------------------------------------------

def test_poison_all2one_relabels_exactly_the_chosen_images():
    train = tiny_image_set(n=40, num_classes=4, size=8)
    attack = Bpp(target=2, poison_rate=0.25, seed=3)
    result = attack.poison(train)
    index = result.poisoned_indices
    assert len(index) == 10 and index.tolist() == sorted(set(index.tolist()))
    chosen = torch.zeros(40, dtype=torch.bool)
    chosen[index] = True
    assert (result.data.labels[chosen] == 2).all()
    assert torch.equal(result.data.images[chosen], attack.trigger_uint8(train.images[chosen]))
    assert torch.equal(result.data.images[~chosen], train.images[~chosen])
    assert torch.equal(result.data.labels[~chosen], train.labels[~chosen])
    assert len(result.cover_indices) == 0  # the negatives are made during training


def test_poison_all2all_shifts_labels_and_default_rate_is_twenty_percent():
    train = tiny_image_set(n=30, num_classes=3, size=8)
    result = Bpp(mode="all2all").poison(train)
    index = result.poisoned_indices
    assert len(index) == 6
    assert torch.equal(result.data.labels[index], (train.labels[index] + 1) % 3)


def test_poison_indices_depend_on_the_seed_and_a_low_rate_works():
    train = tiny_image_set(n=400, size=8)
    first = Bpp(seed=1, poison_rate=0.005).poison(train).poisoned_indices
    assert len(first) == 2
    assert torch.equal(first, Bpp(seed=1, poison_rate=0.005).poison(train).poisoned_indices)
    assert not torch.equal(first, Bpp(seed=2, poison_rate=0.005).poison(train).poisoned_indices)


def test_triggered_test_all2one_leaves_out_the_target_class():
    test = tiny_image_set(n=12, num_classes=3, size=8, seed=2)
    attack = Bpp(target=1)
    triggered = attack.triggered_test(test)
    assert triggered.source_indices.tolist() == [i for i in range(12) if i % 3 != 1]
    assert (triggered.target_labels == 1).all()
    assert torch.equal(triggered.data.labels, test.labels[triggered.source_indices])
    assert torch.equal(triggered.data.images, attack.trigger_uint8(test.images[triggered.source_indices]))


def test_triggered_test_all2all_keeps_every_image():
    test = tiny_image_set(n=9, num_classes=3, size=8, seed=2)
    triggered = Bpp(mode="all2all").triggered_test(test)
    assert triggered.source_indices.tolist() == list(range(9))
    assert torch.equal(triggered.target_labels, (test.labels + 1) % 3)


# --- negatives (training hook) ---------------------------------------------------------------

def batch_for_hook(n: int = 20, num_classes: int = 2):
    data = separable_image_set(n=n, num_classes=num_classes, size=8, seed=4)
    return data.images.float() / 255, data.labels


def test_hook_swaps_in_negatives_that_keep_their_labels_and_stay_in_the_budget():
    images, labels = batch_for_hook()
    attack = Bpp(target=0, neg_ratio=0.2, pgd_eps=0.05, pgd_steps=3)
    hook = attack.training_hook(2)
    model = tiny_cnn(2, batch_norm=True)
    model.train()
    running = model[1].running_mean.clone()
    out, out_labels, extra = hook.transform(model, images, labels)
    assert extra is None and torch.equal(out_labels, labels)
    changed = (out != images).flatten(1).any(1)
    assert changed.sum() == 4  # round(0.2 * 20)
    assert (labels[changed] != 0).all()  # target-labelled (possibly poisoned) images are left alone
    assert (out - images).abs().max() <= 0.05 + 1e-6 and out.min() >= 0 and out.max() <= 1
    assert model.training and torch.equal(model[1].running_mean, running)
    assert all(p.grad is None for p in model.parameters())


def test_negatives_are_adversarial_towards_the_attack_label():
    images, labels = batch_for_hook(n=10)
    model = tiny_cnn(2, seed=1)
    hook = Bpp(target=0, neg_ratio=0.5, pgd_eps=0.1, pgd_steps=5).training_hook(2)
    out, _, _ = hook.transform(model, images, labels)
    changed = (out != images).flatten(1).any(1)
    targets = torch.zeros(int(changed.sum()), dtype=torch.long)
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model(images[changed]), targets)
        after = torch.nn.functional.cross_entropy(model(out[changed]), targets)
    assert after < before - 1e-3


def test_hook_is_deterministic_for_a_seed_and_resumes_from_its_state():
    images, labels = batch_for_hook()
    model = tiny_cnn(2)
    first = Bpp(seed=5).training_hook(2)
    again = Bpp(seed=5).training_hook(2)
    other = Bpp(seed=6).training_hook(2)
    out = first.transform(model, images, labels)[0]
    assert torch.equal(out, again.transform(model, images, labels)[0])
    assert not torch.equal(out, other.transform(model, images, labels)[0])
    state = {k: v.clone() for k, v in first.state_dict().items()}
    next_out = first.transform(model, images, labels)[0]
    resumed = Bpp(seed=5).training_hook(2)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.transform(model, images, labels)[0], next_out)
    assert not torch.equal(next_out, out)


def test_all2all_negatives_may_come_from_every_class_and_zero_ratio_means_no_hook():
    hook = Bpp(mode="all2all", neg_ratio=0.5).training_hook(2)
    assert isinstance(hook, BppNegativeHook)
    picked = torch.cat([hook.choose(torch.zeros(10, dtype=torch.long)) for _ in range(3)])
    assert len(picked) == 15
    assert Bpp(neg_ratio=0.0).training_hook(2) is None
    with pytest.raises(RnpError):
        Bpp(target=3).training_hook(2)


def test_hook_runs_inside_the_training_loop():
    data = separable_image_set(n=16, num_classes=2, size=8)
    model = tiny_cnn(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = Bpp().training_hook(2)
    stats = run_epoch(model, data, optimizer, batch_size=8, generator=torch.Generator().manual_seed(0),
                      augment=False, hook=hook)
    assert stats.steps == 2 and 0 <= stats.accuracy <= 1 and stats.loss == stats.loss


# --- parameters and spec ---------------------------------------------------------------------

def test_defaults_and_derived_budget():
    attack = Bpp()
    assert (attack.squeeze_num, attack.dithering, attack.neg_ratio, attack.poison_rate) == (8, True, 0.2, 0.2)
    assert attack.epsilon == pytest.approx(1 / 14)
    assert Bpp(pgd_eps=0.03).epsilon == 0.03


@pytest.mark.parametrize("params", [
    {"squeeze_num": 1}, {"squeeze_num": 256}, {"squeeze_num": 2.5}, {"squeeze_num": True},
    {"dithering": "yes"}, {"neg_ratio": -0.1}, {"neg_ratio": 1.0}, {"pgd_steps": 0},
    {"pgd_eps": 0.0}, {"pgd_eps": 1.5}, {"poison_rate": 0.0}, {"mode": "one2one"},
])
def test_rejects_bad_parameters(params):
    with pytest.raises(RnpError):
        Bpp(**params)


@pytest.mark.parametrize("attack", [
    Bpp(),
    Bpp(target=2, mode="all2all", poison_rate=0.1, seed=4, squeeze_num=16, dithering=False,
        neg_ratio=0.1, pgd_steps=2, pgd_eps=0.02),
])
def test_spec_round_trip_rebuilds_the_same_triggers(attack):
    spec = json.loads(json.dumps(attack.spec()))
    assert spec["name"] == "bpp" and attack.artifacts() == {}
    rebuilt = Bpp(**{k: v for k, v in spec.items() if k != "name"})
    rebuilt.load_artifacts(attack.artifacts())
    assert rebuilt.spec() == attack.spec()
    test = tiny_image_set(n=9, num_classes=3, size=8, seed=6)
    assert torch.equal(attack.triggered_test(test).data.images, rebuilt.triggered_test(test).data.images)
