"""NFT: MixUp, the masks' schedule and floors, folding, and the contracts, on the synthetic backdoor."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import fixture_seed, separable_image_set, tiny_cnn
from rnp.data.loader import iterate_batches
from rnp.defenses.masks import MaskSet
from rnp.defenses.nft import NFT, MixUp, NFTConfig
from rnp.errors import RnpError
from rnp.metrics import evaluate_backdoor
from rnp.utils import generator_for

pytestmark = pytest.mark.usefixtures("one_thread")

# 200 updates of batch 32 on the 200-image synthetic set instead of the release's 1,000 of 128,
# at four times its learning rate so that the short run moves the masks as far.
FAST = dict(rounds=5, steps_per_round=40, batch_size=32, lr=0.2)


@pytest.fixture(scope="module")
def result(synthetic_backdoor):
    return NFT(**FAST).fit(synthetic_backdoor.model, synthetic_backdoor.clean)


def test_backdoor_is_removed_and_clean_accuracy_kept(result, synthetic_backdoor):
    sb = synthetic_backdoor
    after = evaluate_backdoor(result.model, sb.test, sb.triggered)
    # Over fixture seeds 0-4: CA 0.82-0.92; ASR 0.00, 0.99, 0.12, 0.16, 0.09. NFT leaves the
    # backdoor of seed 1 in place, also at the release's full budget (1,000 updates of 128 at lr
    # 0.05: ASR 0.89), so that seed is an expected failure, not a budget to tune away.
    assert after.clean_accuracy >= 0.75
    if fixture_seed() // 1000 == 1:
        pytest.xfail(f"NFT leaves the backdoor of fixture seed 1 (ASR {after.attack_success_rate:.2f})")
    assert after.attack_success_rate < 0.3


@pytest.mark.parametrize("ablation", [{"augment": False}, {"floor_scale": 1.0, "floor_decay": 0.0}],
                         ids=["no-crop-and-flip", "masks-pinned-at-1"])
def test_without_the_masks_moving_on_cropped_images_the_backdoor_stays(synthetic_backdoor, ablation):
    """The control, same budget: with masks pinned at 1 only the BatchNorm statistics change
    (refreshed on the mixed images), and without crop and flip the masks move (mean 0.8) but the
    mixed clean images, which the model trained without augmentation already fits, do not move
    them off the backdoor. Both leave it on every fixture seed 0-4 (ASR >= 0.99): what removes it
    here is fitting the masks to cropped and flipped images. MixUp does not decide it: without it
    (mixup_alpha 0) ASR was 0.00, 0.21, 0.18, 1.00, 0.03 over seeds 0-4, with it 0.00, 0.99,
    0.12, 0.16, 0.09."""
    sb = synthetic_backdoor
    control = NFT(**FAST, **ablation).fit(sb.model, sb.clean)
    assert evaluate_backdoor(control.model, sb.test, sb.triggered).attack_success_rate > 0.8


def test_purified_model_is_a_plain_model_that_differs_only_in_batchnorm(result, synthetic_backdoor):
    """The weights stay frozen: the masks are folded into the BatchNorm scales, whose running
    statistics the masked model updated; every other tensor is the original's."""
    original, purified = synthetic_backdoor.model, result.model
    assert type(purified) is type(original) and not purified.training
    assert not any(hasattr(m, "parametrizations") for m in purified.modules())
    assert all(type(m) is type(o) for m, o in zip(purified.modules(), original.modules()))
    before, after = original.state_dict(), purified.state_dict()
    assert set(before) == set(after)
    batchnorms = {name for name, m in original.named_modules() if isinstance(m, nn.BatchNorm2d)}
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and {key.rpartition(".")[0] for key in changed} <= batchnorms
    assert not any(key.endswith(".bias") for key in changed)
    masks = result.masks
    for index, (name, size) in enumerate(zip(masks.layer_names, masks.sizes)):
        start = sum(masks.sizes[:index])
        expected = before[f"{name}.weight"] * masks.values[start:start + size]
        assert torch.allclose(after[f"{name}.weight"], expected)
    assert all(p.requires_grad for p in purified.parameters())


def test_masks_stay_between_their_layer_floor_and_one(result):
    masks, floors = result.masks, NFTConfig(**FAST).floors(len(result.masks.sizes))
    floor_of = torch.tensor(floors)[masks.layers]
    assert bool((masks.values >= floor_of - 1e-6).all()) and bool((masks.values <= 1).all())
    assert masks.values.min() < 0.5  # deep layers, whose floor is near 0, did fall
    summary = result.report["masks"]
    assert summary["count"] == len(masks) and summary["below_half"] == int((masks.values < 0.5).sum())
    assert summary["min"] == pytest.approx(float(masks.values.min()))


def test_report_has_one_row_per_round_with_the_cosine_learning_rate(result):
    rows = result.report["rounds"]
    assert [row["round"] for row in rows] == list(range(1, FAST["rounds"] + 1))
    assert [row["steps"] for row in rows][-1] == FAST["rounds"] * FAST["steps_per_round"]
    lrs = [row["lr"] for row in rows]
    assert lrs[0] == FAST["lr"] and lrs == sorted(lrs, reverse=True) and lrs[-1] > 0.4 * FAST["lr"]
    assert all(0 <= row["accuracy"] <= 1 and row["loss"] > 0 and row["seconds"] > 0 for row in rows)
    assert rows[-1]["mask_mean"] < 1 and result.report["mask_layers"]["layer_types"] == ["BatchNorm2d"]
    assert result.report["seconds"]["fine_tune_masks"] > 0


def test_mixup_mixes_each_batch_with_a_shuffled_copy_and_scores_both_labels(synthetic_backdoor):
    images, labels = next(iterate_batches(synthetic_backdoor.clean, 16))
    mixup = MixUp(alpha=1.0, seed=3)
    mixed, kept, extra = mixup.transform(None, images, labels)
    w = mixup.weight
    assert 0 <= w <= 1 and extra is None and torch.equal(kept, labels)
    order = torch.randperm(len(labels), generator=generator_for(3, "nft-mixup-pairs"))
    assert torch.allclose(mixed, w * images + (1 - w) * images[order])
    assert torch.equal(mixup.partner_labels, labels[order])
    logits = torch.randn(len(labels), 10)
    soft = w * F.one_hot(labels, 10) + (1 - w) * F.one_hot(mixup.partner_labels, 10)
    assert torch.allclose(mixup.loss(logits, labels), F.cross_entropy(logits, soft.float()))
    unmixed = MixUp(alpha=0.0, seed=3)
    assert torch.equal(unmixed.transform(None, images, labels)[0], images) and unmixed.weight == 1.0


def test_schedule_and_floors_are_the_release_formulas():
    cfg = NFTConfig()
    assert cfg.lr_at(0) == 0.05
    expected = 0.02 + 0.03 * (1 + math.cos(math.pi * 2 / 5)) / 2
    assert cfg.lr_at(2) == pytest.approx(expected)
    assert cfg.floors(3) == pytest.approx([0.8 * math.exp(-0.5 * layer) for layer in (1, 2, 3)])
    assert NFTConfig(floor_decay=0.0).floors(2) == [0.8, 0.8]


def test_folding_masks_keeps_the_function_and_the_class():
    model = tiny_cnn(num_classes=3, batch_norm=True).eval()
    images = torch.rand(4, 3, 8, 8)
    masks = MaskSet(model)
    with torch.no_grad():
        masks.parameters[0].copy_(torch.tensor([1.0, 0.5, 0.0, 0.25]))
        expected = model(images)
    weight = masks.layers[0][1].parametrizations.weight.original
    masks.fold()
    assert type(model[1]) is nn.BatchNorm2d and model[1].weight is weight
    assert torch.allclose(model(images), expected)
    assert set(model.state_dict()) == set(tiny_cnn(num_classes=3, batch_norm=True).state_dict())


def test_the_regulariser_keeps_masks_nearer_one(synthetic_backdoor):
    sb = synthetic_backdoor
    short = dict(rounds=1, steps_per_round=10, batch_size=32, lr=0.2)
    free = NFT(**short, mask_penalty=0.0).fit(sb.model, sb.clean).masks.values
    held = NFT(**short, mask_penalty=20.0).fit(sb.model, sb.clean).masks.values
    assert held.mean() > free.mean() + 0.05


def test_same_seed_repeats_exactly_and_another_seed_differs(synthetic_backdoor):
    sb = synthetic_backdoor
    small = sb.clean.subset(range(64))
    runs = [NFT(rounds=1, steps_per_round=3, batch_size=32, seed=seed).fit(sb.model, small).masks.values
            for seed in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_input_model_is_untouched(synthetic_backdoor):
    model = copy.deepcopy(synthetic_backdoor.model).train()
    before = copy.deepcopy(model.state_dict())
    NFT(rounds=1, steps_per_round=2, batch_size=32).fit(model, synthetic_backdoor.clean.subset(range(64)))
    assert model.training and not any(hasattr(m, "parametrizations") for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_models_without_batchnorm_get_convolution_masks():
    model = tiny_cnn(num_classes=2)
    result = NFT(rounds=1, steps_per_round=2, batch_size=16).fit(model, separable_image_set(n=32))
    assert result.report["mask_layers"]["layer_types"] == ["Conv2d"]
    assert type(result.model[0]) is nn.Conv2d


def test_bad_settings_are_refused():
    for bad in ({"rounds": 0}, {"steps_per_round": 0}, {"batch_size": 2.5}, {"lr": 0},
                {"final_lr_fraction": 1.5}, {"momentum": 1.0}, {"mixup_alpha": -1},
                {"mask_penalty": -0.1}, {"floor_scale": 1.2}, {"floor_decay": -1},
                {"mask_layers": "attention"}, {"augment": "yes"}):
        with pytest.raises(RnpError):
            NFTConfig(**bad)
    with pytest.raises(RnpError, match="no setting"):
        NFT(epochs=3)


def test_defaults_are_the_release_recipe():
    c = NFTConfig()
    assert (c.rounds, c.steps_per_round, c.batch_size, c.lr, c.final_lr_fraction, c.momentum) == (
        5, 200, 128, 0.05, 0.4, 0.95)
    assert (c.mixup_alpha, c.mask_penalty, c.floor_scale, c.floor_decay) == (1.0, 0.001, 0.8, 0.5)
    assert c.augment and c.mask_layers == "auto"
