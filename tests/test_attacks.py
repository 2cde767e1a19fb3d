"""BadNets and Blend triggers, poisoning, triggered test sets, specs and the attack registry."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_image_set
from rnp.attacks import ATTACKS, BadNets, Blend, attack_from_spec, build_attack
from rnp.data.images import ImageSet
from rnp.errors import RnpError

GRID = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.uint8) * 255


def mid_gray_set(n: int = 4, size: int = 32, value: int = 128) -> ImageSet:
    """Images of one gray value, so any stamped 0 or 255 pixel stands out."""
    images = torch.full((n, 3, size, size), value, dtype=torch.uint8)
    return ImageSet(images, torch.arange(n) % 2, ("a", "b"))


# --- BadNets trigger -------------------------------------------------------------------------

def test_badnets_default_stamps_the_official_grid_bottom_right():
    data = tiny_image_set(n=5, size=32, seed=1)
    out = BadNets().trigger_uint8(data.images)
    for channel in range(3):
        assert torch.equal(out[:, channel, 29:, 29:], GRID.expand(5, 3, 3))
    untouched = torch.ones(32, 32, dtype=torch.bool)
    untouched[29:, 29:] = False
    assert torch.equal(out[:, :, untouched], data.images[:, :, untouched])


def test_badnets_float_trigger_matches_pattern():
    images = torch.full((2, 3, 8, 8), 0.5)
    out = BadNets().apply_trigger(images)
    assert torch.equal(out[0, 1, 5:, 5:], GRID.float() / 255)
    assert torch.equal(images, torch.full((2, 3, 8, 8), 0.5))  # the input is not modified


def test_badnets_custom_white_patch_size_and_location():
    data = mid_gray_set(size=16)
    out = BadNets(patch="white", size=4, location=(2, 5)).trigger_uint8(data.images)
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[2:6, 5:9] = True
    assert (out[:, :, region] == 255).all()
    assert (out[:, :, ~region] == 128).all()


def test_badnets_black_patch_and_scaled_grid():
    assert torch.equal(BadNets(patch="black", size=2).pattern(), torch.zeros(2, 2))
    scaled = BadNets(size=6).pattern()  # nearest-neighbour upscaling of the 3x3 grid
    assert torch.equal(scaled, (GRID.float() / 255).repeat_interleave(2, 0).repeat_interleave(2, 1))


@pytest.mark.parametrize("attack", [
    BadNets(size=9),                        # larger than the image
    BadNets(size=3, location=(6, 0)),       # runs past the bottom edge
    BadNets(size=3, location=(0, -1)),      # negative column
])
def test_badnets_patch_that_does_not_fit_raises(attack):
    with pytest.raises(RnpError):
        attack.apply_trigger(torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("params", [{"patch": "rainbow"}, {"size": 0}])
def test_badnets_rejects_bad_parameters(params):
    with pytest.raises(RnpError):
        BadNets(**params)


# --- poisoning -------------------------------------------------------------------------------

@pytest.mark.parametrize("rate, n", [(0.1, 40), (0.3, 40), (0.2, 25), (0.05, 30)])
def test_poison_count_is_rounded_rate(rate, n):
    train = tiny_image_set(n=n, size=8)
    poisoned = BadNets(poison_rate=rate).poison(train)
    assert len(poisoned.poisoned_indices) == round(rate * n)
    assert len(set(poisoned.poisoned_indices.tolist())) == round(rate * n)


def test_poison_all2one_relabels_and_stamps_only_the_chosen_images():
    train = tiny_image_set(n=40, num_classes=4, size=8)
    attack = BadNets(target=2, poison_rate=0.25, seed=3)
    result = attack.poison(train)
    index = result.poisoned_indices
    chosen = torch.zeros(40, dtype=torch.bool)
    chosen[index] = True
    assert (result.data.labels[chosen] == 2).all()
    assert torch.equal(result.data.images[chosen], attack.trigger_uint8(train.images[chosen]))
    assert torch.equal(result.data.images[~chosen], train.images[~chosen])
    assert torch.equal(result.data.labels[~chosen], train.labels[~chosen])
    assert train.labels.tolist() == (torch.arange(40) % 4).tolist()  # the input is not modified
    assert result.data.classes == train.classes


def test_poison_all2all_shifts_labels_by_one():
    train = tiny_image_set(n=30, num_classes=3, size=8)
    result = BadNets(mode="all2all", poison_rate=0.5).poison(train)
    index = result.poisoned_indices
    assert torch.equal(result.data.labels[index], (train.labels[index] + 1) % 3)


def test_poison_indices_are_deterministic_for_a_seed():
    train = tiny_image_set(n=50, size=8)
    first = BadNets(seed=1).poison(train).poisoned_indices
    again = BadNets(seed=1).poison(train).poisoned_indices
    other = BadNets(seed=2).poison(train).poisoned_indices
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.tolist() == sorted(first.tolist())


def test_poison_rejects_target_outside_the_classes():
    with pytest.raises(RnpError):
        BadNets(target=3).poison(tiny_image_set(n=12, num_classes=3, size=8))


# --- triggered test set ----------------------------------------------------------------------

def test_triggered_test_all2one_leaves_out_target_class():
    test = tiny_image_set(n=12, num_classes=3, size=8, seed=2)
    attack = BadNets(target=1)
    triggered = attack.triggered_test(test)
    source = triggered.source_indices
    assert source.tolist() == [i for i in range(12) if i % 3 != 1]
    assert (triggered.target_labels == 1).all()
    assert torch.equal(triggered.data.labels, test.labels[source])
    assert torch.equal(triggered.data.images, attack.trigger_uint8(test.images[source]))


def test_triggered_test_all2all_keeps_every_image():
    test = tiny_image_set(n=12, num_classes=3, size=8, seed=2)
    triggered = BadNets(mode="all2all").triggered_test(test)
    assert triggered.source_indices.tolist() == list(range(12))
    assert torch.equal(triggered.data.labels, test.labels)
    assert torch.equal(triggered.target_labels, (test.labels + 1) % 3)


# --- Blend -----------------------------------------------------------------------------------

def test_blend_mixes_image_and_pattern():
    data = tiny_image_set(n=6, size=8, seed=4)
    attack = Blend(alpha=0.3, pattern_seed=5)
    pattern = attack.pattern_for(data.images.shape)
    expected = 0.7 * data.images.float() / 255 + 0.3 * pattern
    out = attack.trigger_uint8(data.images).float() / 255
    assert (out - expected).abs().max() <= 0.5 / 255 + 1e-6
    assert not torch.equal(out, data.images.float() / 255)


def test_blend_pattern_is_deterministic_for_its_seed():
    shape = torch.Size((2, 3, 8, 8))
    first = Blend(pattern_seed=1).pattern_for(shape)
    assert first.shape == (3, 8, 8) and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, Blend(pattern_seed=1).pattern_for(shape))
    assert not torch.equal(first, Blend(pattern_seed=2).pattern_for(shape))
    images = torch.rand(2, 3, 8, 8)
    assert torch.equal(Blend(pattern_seed=1).apply_trigger(images),
                       Blend(pattern_seed=1).apply_trigger(images))


def test_blend_uses_and_stores_a_user_pattern():
    pattern = torch.zeros(3, 8, 8)
    pattern[0] = 1.0  # pure red
    attack = Blend(alpha=0.5, pattern=pattern)
    out = attack.apply_trigger(torch.zeros(1, 3, 8, 8))
    assert torch.allclose(out[0, 0], torch.full((8, 8), 0.5))
    assert (out[0, 1:] == 0).all()
    assert torch.equal(attack.artifacts()["pattern"], pattern)
    assert "pattern" not in attack.spec()


@pytest.mark.parametrize("params", [{"alpha": 0.0}, {"alpha": 1.5},
                                    {"pattern": torch.full((3, 4, 4), 2.0)},
                                    {"pattern": torch.zeros(4, 4)}])
def test_blend_rejects_bad_parameters(params):
    with pytest.raises(RnpError):
        Blend(**params)


# --- spec, registry and parameter checks -----------------------------------------------------

@pytest.mark.parametrize("attack", [
    BadNets(target=1, mode="all2one", poison_rate=0.2, seed=4, patch="white", size=2, location=(1, 3)),
    BadNets(mode="all2all"),
    Blend(target=2, alpha=0.4, pattern_seed=9),
    Blend(alpha=0.25, pattern=torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))),
])
def test_spec_round_trip_rebuilds_the_same_triggers(attack):
    spec = attack.spec()
    assert json.loads(json.dumps(spec)) == spec
    assert spec["name"] == attack.name and ATTACKS[spec["name"]] is type(attack)
    rebuilt = attack_from_spec(json.loads(json.dumps(spec)), attack.artifacts())
    assert type(rebuilt) is type(attack) and rebuilt.spec() == spec
    test = tiny_image_set(n=9, num_classes=3, size=8, seed=6)
    original, again = attack.triggered_test(test), rebuilt.triggered_test(test)
    assert torch.equal(original.data.images, again.data.images)
    assert torch.equal(original.target_labels, again.target_labels)


def test_build_attack_by_name():
    attack = build_attack("badnets", target=3, poison_rate=0.05)
    assert isinstance(attack, BadNets) and attack.target == 3 and attack.poison_rate == 0.05
    assert isinstance(build_attack("blend"), Blend)


@pytest.mark.parametrize("build", [
    lambda: build_attack("nope"),                           # unknown attack
    lambda: build_attack("badnets", alpha=0.2),             # Blend's parameter, not BadNets'
    lambda: attack_from_spec({"name": "blend", "colour": 1}),
    lambda: attack_from_spec({"target": 0}),                 # no name at all
    lambda: build_attack("badnets", mode="one2all"),
    lambda: build_attack("blend", poison_rate=0.0),
    lambda: build_attack("blend", poison_rate=1.0),
    lambda: build_attack("badnets", poison_rate=-0.1),
])
def test_invalid_attacks_raise_rnp_error(build):
    with pytest.raises(RnpError):
        build()
