"""WaNet (fixed warping field, noise mode) and Adaptive-Blend (partial triggers, conservatism samples)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_image_set

from rnp.attacks.adaptive_blend import AdaptiveBlend
from rnp.attacks.blend import Blend
from rnp.attacks.wanet import WaNet, identity_grid
from rnp.data.images import ImageSet
from rnp.errors import RnpError


def ramp_set(n: int = 40, size: int = 16, num_classes: int = 4) -> ImageSet:
    """Images that brighten linearly from left to right, so a warp shows up as a known shift."""
    row = (torch.arange(size).float() * 255 / (size - 1)).round().to(torch.uint8)
    images = row.expand(n, 3, size, size).contiguous()
    return ImageSet(images, torch.arange(n) % num_classes, tuple(str(i) for i in range(num_classes)))


def gray_set(n: int = 8, size: int = 16, value: int = 128, num_classes: int = 2) -> ImageSet:
    images = torch.full((n, 3, size, size), value, dtype=torch.uint8)
    return ImageSet(images, torch.arange(n) % num_classes, tuple(str(i) for i in range(num_classes)))


def rebuilt(attack):
    spec = json.loads(json.dumps(attack.spec()))
    assert spec["name"] == attack.name
    copy = type(attack)(**{k: v for k, v in spec.items() if k != "name"}, **attack.artifacts())
    copy.load_artifacts({})
    assert copy.spec() == attack.spec()
    return copy


# --- WaNet: the warp -------------------------------------------------------------------------

def test_wanet_control_offsets_are_normalised_random_noise():
    offsets = WaNet(k=5).control_offsets()
    assert offsets.shape == (2, 5, 5)
    assert offsets.abs().mean().item() == pytest.approx(1.0, abs=1e-6)
    assert len(offsets.unique()) == 50


def test_wanet_grid_is_identity_plus_a_small_scaled_field():
    attack = WaNet()
    grid = attack.warp_grid(32, 32)
    assert grid.shape == (32, 32, 2) and grid.abs().max() <= 1
    shift = grid - identity_grid(32, 32)
    bound = attack.s * attack.control_offsets().abs().max() / 32  # bicubic may overshoot a little
    assert 0 < shift.abs().max() <= 1.5 * bound
    pixels = shift.abs() * 31 / 2  # in pixels
    assert 0.05 < pixels.max() < 1.0  # imperceptible: less than a pixel everywhere


def test_wanet_warps_a_ramp_to_the_sampled_coordinates():
    images = torch.linspace(0, 1, 16).expand(2, 3, 16, 16).clone()
    before = images.clone()
    attack = WaNet(warp_seed=3)
    out = attack.apply_trigger(images)
    assert torch.equal(images, before)  # the input is not modified
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    expected = (attack.warp_grid(16, 16)[..., 0] + 1) / 2  # bilinear sampling of a linear ramp is exact
    assert torch.allclose(out, expected.expand_as(out), atol=1e-5)
    change = (out - images).abs()
    assert 0.005 < change.max() < 1 / 15  # moved, by less than one pixel step of the ramp


def test_wanet_zero_strength_leaves_images_unchanged():
    data = tiny_image_set(n=4, size=16, seed=2)
    attack = WaNet(s=0.0)
    assert torch.allclose(attack.apply_trigger(data.images.float() / 255), data.images.float() / 255, atol=1e-5)
    assert torch.equal(attack.trigger_uint8(data.images), data.images)


def test_wanet_is_deterministic_for_its_warp_seed_only():
    data = tiny_image_set(n=4, size=16, seed=1)
    first = WaNet(warp_seed=1).trigger_uint8(data.images)
    assert torch.equal(first, WaNet(warp_seed=1, seed=7).trigger_uint8(data.images))
    assert not torch.equal(first, WaNet(warp_seed=2).trigger_uint8(data.images))
    assert not torch.equal(first, data.images)


def test_wanet_works_on_non_square_images_and_refuses_single_pixel_rows():
    attack = WaNet()
    images = torch.linspace(0, 1, 16).expand(2, 1, 4, 16).clone()
    out = attack.apply_trigger(images)
    grid = attack.warp_grid(4, 16)
    assert out.shape == (2, 1, 4, 16)
    assert torch.allclose(out, ((grid[..., 0] + 1) / 2).expand_as(out), atol=1e-5)
    shift_x = (grid - identity_grid(4, 16))[..., 0].abs() * 15 / 2  # x offsets scale with the width
    assert shift_x.max() <= 1.5 * attack.s * attack.control_offsets()[0].abs().max() * 15 / 32
    with pytest.raises(RnpError):
        WaNet().apply_trigger(torch.rand(1, 3, 1, 8))


# --- WaNet: poisoning with noise mode --------------------------------------------------------

def test_wanet_poison_relabels_warped_images_and_adds_noisy_covers():
    train = ramp_set(n=40, size=16)
    attack = WaNet(target=1, poison_rate=0.1, seed=2)
    result = attack.poison(train)
    poisoned, cover = result.poisoned_indices, result.cover_indices
    assert len(poisoned) == 4 and len(cover) == 8
    assert not set(poisoned.tolist()) & set(cover.tolist())
    assert cover.tolist() == sorted(cover.tolist())
    assert (result.data.labels[poisoned] == 1).all()
    assert torch.equal(result.data.labels[cover], train.labels[cover])
    assert torch.equal(result.data.images[poisoned], attack.trigger_uint8(train.images[poisoned]))
    pure_warp = attack.trigger_uint8(train.images[cover])
    for image, clean, warped in zip(result.data.images[cover], train.images[cover], pure_warp):
        assert not torch.equal(image, clean) and not torch.equal(image, warped)
        # a perturbation of at most 1/16 in normalised x is 15/32 pixel: 255/32 gray levels on this ramp
        assert (image.int() - warped.int()).abs().max() <= 255 / 32 + 1
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[torch.cat([poisoned, cover])] = False
    assert torch.equal(result.data.images[untouched], train.images[untouched])
    assert torch.equal(result.data.labels[untouched], train.labels[untouched])


def test_wanet_cover_images_differ_from_each_other():
    train = ramp_set(n=40, size=16)
    result = WaNet(poison_rate=0.1).poison(train)
    covers = result.data.images[result.cover_indices]
    assert not torch.equal(covers[0], covers[1])  # a fresh perturbation per image


def test_wanet_poison_is_deterministic_per_seed():
    train = tiny_image_set(n=60, size=8)
    first, again, other = (WaNet(seed=s).poison(train) for s in (1, 1, 2))
    assert torch.equal(first.data.images, again.data.images)
    assert torch.equal(first.cover_indices, again.cover_indices)
    assert not torch.equal(first.poisoned_indices, other.poisoned_indices)
    assert not torch.equal(first.cover_indices, other.cover_indices)


def test_wanet_without_noise_mode_and_with_too_many_covers():
    train = tiny_image_set(n=40, size=8)
    assert len(WaNet(cross_ratio=0).poison(train).cover_indices) == 0
    with pytest.raises(RnpError):
        WaNet(poison_rate=0.4, cross_ratio=2).poison(train)  # 16 poisoned + 32 covers > 40


def test_wanet_all2all_and_low_rate():
    train = tiny_image_set(n=30, num_classes=3, size=8)
    result = WaNet(mode="all2all", poison_rate=0.2).poison(train)
    index = result.poisoned_indices
    assert torch.equal(result.data.labels[index], (train.labels[index] + 1) % 3)
    low = WaNet(poison_rate=0.005).poison(tiny_image_set(n=200, size=8))
    assert len(low.poisoned_indices) == 1 and len(low.cover_indices) == 2


def test_wanet_triggered_test_leaves_out_target_class():
    test = tiny_image_set(n=12, num_classes=3, size=8, seed=2)
    attack = WaNet(target=2)
    triggered = attack.triggered_test(test)
    assert triggered.source_indices.tolist() == [i for i in range(12) if i % 3 != 2]
    assert (triggered.target_labels == 2).all()
    assert torch.equal(triggered.data.images, attack.trigger_uint8(test.images[triggered.source_indices]))


@pytest.mark.parametrize("params", [{"k": 0}, {"k": 2.5}, {"s": -0.1}, {"grid_rescale": 0},
                                    {"cross_ratio": -1}, {"warp_seed": "a"}, {"s": True}])
def test_wanet_rejects_bad_parameters(params):
    with pytest.raises(RnpError):
        WaNet(**params)


def test_wanet_spec_round_trip():
    attack = WaNet(target=1, poison_rate=0.2, seed=3, k=6, s=0.75, grid_rescale=0.98, cross_ratio=1,
                   warp_seed=5)
    assert attack.artifacts() == {}
    copy = rebuilt(attack)
    test, train = tiny_image_set(n=9, num_classes=3, size=8, seed=6), tiny_image_set(n=20, size=8)
    assert torch.equal(attack.triggered_test(test).data.images, copy.triggered_test(test).data.images)
    assert torch.equal(attack.poison(train).data.images, copy.poison(train).data.images)


# --- Adaptive-Blend --------------------------------------------------------------------------

def test_adaptive_blend_defaults_are_the_papers():
    attack = AdaptiveBlend()
    assert (attack.poison_rate, attack.cover_rate, attack.train_alpha, attack.test_alpha) == (0.003, 0.003, 0.15, 0.2)
    assert (attack.pieces, attack.mask_rate, attack.kept_pieces, attack.mode) == (16, 0.5, 8, "all2one")


def test_adaptive_blend_test_trigger_is_the_whole_pattern_at_test_alpha():
    attack = AdaptiveBlend(pattern=torch.ones(3, 8, 8))
    images = torch.zeros(2, 3, 8, 8)
    assert torch.allclose(attack.apply_trigger(images), torch.full((2, 3, 8, 8), 0.2))
    assert torch.equal(images, torch.zeros(2, 3, 8, 8))
    noise = AdaptiveBlend(pattern_seed=4)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pattern = noise.pattern_for(x.shape)
    assert torch.equal(pattern, Blend(pattern_seed=4).pattern_for(x.shape))
    assert torch.allclose(noise.apply_trigger(x), 0.8 * x + 0.2 * pattern)


def test_adaptive_blend_pieces_partition_the_image():
    masks = AdaptiveBlend().piece_masks(16, 16)
    assert masks.shape == (16, 16, 16)
    assert torch.equal(masks.sum(0), torch.ones(16, 16, dtype=torch.long))
    assert (masks.sum((1, 2)) == 16).all() and masks[5, 4:8, 4:8].all()  # piece 5: row 1, column 1
    uneven = AdaptiveBlend(pieces=9).piece_masks(10, 11)
    assert torch.equal(uneven.sum(0), torch.ones(10, 11, dtype=torch.long))
    with pytest.raises(RnpError):
        AdaptiveBlend().piece_masks(3, 16)


def test_adaptive_blend_payload_changes_only_its_chosen_pieces():
    train = gray_set(n=8, size=16)
    attack = AdaptiveBlend(target=0, poison_rate=0.25, cover_rate=0.25, pattern=torch.ones(3, 16, 16), seed=1)
    result = attack.poison(train)
    both = torch.cat([result.poisoned_indices, result.cover_indices])
    chosen = attack.choose_pieces(len(both))
    masks = attack.piece_masks(16, 16)
    blended = round((0.85 * 128 / 255 + 0.15) * 255)
    for image, pieces in zip(result.data.images[both], chosen):
        region = masks[pieces].any(0)
        assert region.sum() == 8 * 16  # 8 of the 16 pieces of 4x4 pixels
        assert (image[:, region] == blended).all()
        assert (image[:, ~region] == 128).all()
    untouched = torch.ones(8, dtype=torch.bool)
    untouched[both] = False
    assert (result.data.images[untouched] == 128).all()


def test_adaptive_blend_piece_choices_are_seeded():
    first = AdaptiveBlend(seed=1).choose_pieces(20)
    assert (first.sum(1) == 8).all()
    assert len({tuple(row.tolist()) for row in first}) > 1
    assert torch.equal(first, AdaptiveBlend(seed=1).choose_pieces(20))
    assert not torch.equal(first, AdaptiveBlend(seed=2).choose_pieces(20))
    assert (AdaptiveBlend(pieces=9, mask_rate=0.3).choose_pieces(3).sum(1) == 6).all()


def test_adaptive_blend_payload_and_cover_sets():
    train = tiny_image_set(n=40, num_classes=4, size=8)
    attack = AdaptiveBlend(target=3, poison_rate=0.1, cover_rate=0.15, seed=5)
    result = attack.poison(train)
    payload, cover = result.poisoned_indices, result.cover_indices
    assert len(payload) == 4 and len(cover) == 6
    assert not set(payload.tolist()) & set(cover.tolist())
    assert (train.labels[cover] != 3).all()  # conservatism samples come from the other classes
    assert (result.data.labels[payload] == 3).all()
    assert torch.equal(result.data.labels[cover], train.labels[cover])
    assert not torch.equal(result.data.images[cover], train.images[cover])
    # a partial trigger at opacity 0.15 is not the test trigger
    assert not torch.equal(result.data.images[payload], attack.trigger_uint8(train.images[payload]))


def test_adaptive_blend_poison_is_deterministic_per_seed():
    train = tiny_image_set(n=60, size=8)
    first, again, other = (AdaptiveBlend(poison_rate=0.1, cover_rate=0.1, seed=s).poison(train) for s in (1, 1, 2))
    assert torch.equal(first.data.images, again.data.images)
    assert torch.equal(first.cover_indices, again.cover_indices)
    assert not torch.equal(first.poisoned_indices, other.poisoned_indices)


def test_adaptive_blend_all2all_low_rate_and_no_cover():
    train = tiny_image_set(n=30, num_classes=3, size=8)
    result = AdaptiveBlend(mode="all2all", poison_rate=0.2, cover_rate=0.2).poison(train)
    index = result.poisoned_indices
    assert torch.equal(result.data.labels[index], (train.labels[index] + 1) % 3)
    assert torch.equal(result.data.labels[result.cover_indices], train.labels[result.cover_indices])
    low = AdaptiveBlend(poison_rate=0.005, cover_rate=0.005).poison(tiny_image_set(n=200, size=8))
    assert len(low.poisoned_indices) == 1 and len(low.cover_indices) == 1
    assert len(AdaptiveBlend(poison_rate=0.1, cover_rate=0).poison(train).cover_indices) == 0
    with pytest.raises(RnpError):
        AdaptiveBlend(poison_rate=0.5, cover_rate=0.5).poison(train)  # only 10 non-target images are free


def test_adaptive_blend_triggered_test_leaves_out_target_class():
    test = tiny_image_set(n=12, num_classes=3, size=8, seed=2)
    attack = AdaptiveBlend(target=1)
    triggered = attack.triggered_test(test)
    assert triggered.source_indices.tolist() == [i for i in range(12) if i % 3 != 1]
    assert (triggered.target_labels == 1).all()
    source = test.images[triggered.source_indices].float() / 255
    expected = 0.8 * source + 0.2 * attack.pattern_for(source.shape)
    assert ((triggered.data.images.float() / 255 - expected).abs() <= 0.5 / 255 + 1e-6).all()


@pytest.mark.parametrize("params", [{"pieces": 15}, {"pieces": 0}, {"mask_rate": 1.0}, {"mask_rate": -0.1},
                                    {"pieces": 4, "mask_rate": 0.9}, {"train_alpha": 0}, {"test_alpha": 1.5},
                                    {"cover_rate": 1.0}, {"cover_rate": -0.1}, {"pieces": 2.5},
                                    {"pattern": torch.full((3, 4, 4), 2.0)}, {"pattern": torch.zeros(4, 4)}])
def test_adaptive_blend_rejects_bad_parameters(params):
    with pytest.raises(RnpError):
        AdaptiveBlend(**params)


@pytest.mark.parametrize("attack", [
    AdaptiveBlend(target=2, poison_rate=0.1, cover_rate=0.2, train_alpha=0.1, test_alpha=0.3, pieces=4,
                  mask_rate=0.25, pattern_seed=7, seed=3),
    AdaptiveBlend(poison_rate=0.1, pattern=torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))),
])
def test_adaptive_blend_spec_round_trip(attack):
    assert attack.spec().get("pattern") is None  # a given pattern travels as an artefact
    assert set(attack.artifacts()) == ({"pattern"} if attack.pattern is not None else set())
    copy = rebuilt(attack)
    test, train = tiny_image_set(n=9, num_classes=3, size=8, seed=6), tiny_image_set(n=30, num_classes=3, size=8)
    assert torch.equal(attack.triggered_test(test).data.images, copy.triggered_test(test).data.images)
    assert torch.equal(attack.poison(train).data.images, copy.poison(train).data.images)
