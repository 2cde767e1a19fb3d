"""FT, Fine-Pruning and NAD on the synthetic BadNets backdoor, and their contracts.

The synthetic model was trained without augmentation on 16x16 images. On it, FT at its
defaults (learning rate 0.01, crop + flip) removes the backdoor but costs clean accuracy, since a
4-pixel crop shift is a large change at this size; without augmentation at learning rate 0.01
the backdoor survives. The settings below (no augmentation, learning rate 0.03, batch 32) are
ones where fine-tuning removes it and keeps clean accuracy. Fine-Pruning's pruning alone does not
remove it (the shortcut carries the trigger past the pruned conv), so its tests check the
pruning itself; NAD is checked at a seed where plain fine-tuning of the student for the same 5
epochs leaves the backdoor (ASR 0.70) and NAD removes it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rnp.defenses.fine_pruning import FP, activation_site, last_conv
from rnp.defenses.finetune import FT
from rnp.defenses.masks import prune_channels
from rnp.defenses.nad import NAD, stage_outputs
from rnp.errors import RnpError
from rnp.metrics import accuracy, evaluate_backdoor
from rnp.models import build_model
from rnp.training import predict

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = {"lr": 0.03, "batch_size": 32, "augment": False}
FT_SETTINGS = dict(RECIPE, epochs=20)
NAD_SETTINGS = dict(RECIPE, epochs=5, teacher_epochs=20, milestones=(), betas=(50, 100, 100), seed=1)
FP_SETTINGS = {"epochs": 1, "augment": False}
TINY = {FT: {"epochs": 1}, FP: {"epochs": 1, "max_prune_fraction": 0.1},
        NAD: {"epochs": 1, "teacher_epochs": 1}}


@pytest.fixture(scope="module")
def ft_result(synthetic_backdoor):
    return FT(**FT_SETTINGS).fit(synthetic_backdoor.model, synthetic_backdoor.clean)


@pytest.fixture(scope="module")
def fp_result(synthetic_backdoor):
    return FP(**FP_SETTINGS).fit(synthetic_backdoor.model, synthetic_backdoor.clean)


@pytest.fixture(scope="module")
def nad_result(synthetic_backdoor):
    return NAD(**NAD_SETTINGS).fit(synthetic_backdoor.model, synthetic_backdoor.clean)


def metrics(model, backdoor):
    return evaluate_backdoor(model, backdoor.test, backdoor.triggered)


def clean_accuracy(model, clean):
    return accuracy(predict(model, clean), clean.labels)


def test_ft_changes_the_weights_keeps_ca_and_here_removes_the_backdoor(ft_result, synthetic_backdoor):
    original = dict(synthetic_backdoor.model.named_parameters())
    changed = [name for name, p in ft_result.model.named_parameters() if not torch.equal(p, original[name])]
    assert len(changed) == len(original)
    after = metrics(ft_result.model, synthetic_backdoor)
    assert after.clean_accuracy >= 0.9  # 0.94 on fixture seed 3, 0.95-1.00 on the others
    assert after.attack_success_rate <= 0.1
    assert len(ft_result.report["fine_tuning"]) == 20


def test_fp_pruned_channels_stay_zero_through_fine_tuning(fp_result):
    pruned = [row["channel"] for row in fp_result.report["pruning"]["channels"]]
    weight = dict(fp_result.model.named_modules())[fp_result.report["pruning"]["layer"]].weight
    assert pruned and torch.all(weight[pruned] == 0)
    kept = [c for c in range(weight.shape[0]) if c not in pruned]
    assert all(weight[c].abs().sum() > 0 for c in kept)
    before_tuning = dict(fp_result.artifacts["pruned_model"].named_parameters())
    assert any(not torch.equal(p, before_tuning[name]) for name, p in fp_result.model.named_parameters())


def test_fp_prunes_the_lowest_mean_activations_of_the_last_conv(fp_result, synthetic_backdoor):
    model = synthetic_backdoor.model
    assert fp_result.report["pruning"]["layer"] == "layer4.1.conv2"
    assert fp_result.report["pruning"]["measured_at"] == "layer4.1.conv2"
    outputs = []
    conv = model.layer4[1].conv2
    handle = conv.register_forward_hook(lambda m, i, o: outputs.append(o.abs().mean((0, 2, 3))))
    try:
        model.eval()
        with torch.no_grad():
            model(synthetic_backdoor.clean.images.float() / 255)
    finally:
        handle.remove()
    expected = outputs[0]
    scores = fp_result.artifacts["activations"]
    assert torch.allclose(scores.values, expected, rtol=1e-4, atol=1e-6)
    count = fp_result.report["pruning"]["pruned"]
    pruned = {row["channel"] for row in fp_result.report["pruning"]["channels"]}
    assert pruned == set(torch.argsort(expected)[:count].tolist())


def test_fp_count_is_the_last_before_the_allowed_drop_is_exceeded(fp_result, synthetic_backdoor):
    model, clean = synthetic_backdoor.model, synthetic_backdoor.clean
    scores, order = fp_result.artifacts["activations"], fp_result.artifacts["order"]
    count, total = fp_result.report["pruning"]["pruned"], len(scores)
    base = clean_accuracy(model, clean)
    assert 0 < count <= total

    def accuracy_pruned(number):
        return clean_accuracy(prune_channels(copy.deepcopy(model), scores, order[:number]), clean)

    assert accuracy_pruned(count) >= base - 0.04
    if count < total:
        assert accuracy_pruned(count + 1) < base - 0.04
        assert fp_result.report["pruning"]["stopped_by"] == "accuracy"
    else:  # one fixture seed of five: the skip connection carries the clean task without the layer
        assert fp_result.report["pruning"]["stopped_by"] == "max_prune_fraction"


def test_fp_tighter_allowed_drop_prunes_fewer(fp_result, synthetic_backdoor):
    scores, order = fp_result.artifacts["activations"], fp_result.artifacts["order"]
    tight, _ = FP(allowed_drop=0.0).choose_count(synthetic_backdoor.model, synthetic_backdoor.clean,
                                                 scores, order, "cpu")
    # no more; as many on one fixture seed of five, where the whole layer can go within 4 points
    assert tight <= fp_result.report["pruning"]["pruned"]
    capped, selection = FP(max_prune_fraction=0.25).choose_count(
        synthetic_backdoor.model, synthetic_backdoor.clean, scores, order, "cpu")
    assert capped == 16 and selection["stopped_by"] == "max_prune_fraction"


def test_fp_finds_the_last_conv_and_measures_after_its_activation():
    vgg = build_model("vgg16_bn", num_classes=10, width=8)
    layer, _ = last_conv(vgg)
    assert isinstance(vgg.get_submodule(layer), nn.Conv2d)
    site = activation_site(vgg, layer)
    assert isinstance(vgg.get_submodule(site), nn.ReLU)
    assert int(site.split(".")[1]) == int(layer.split(".")[1]) + 2  # conv, BatchNorm, ReLU
    preact = build_model("preact_resnet18", num_classes=10, width=8)
    assert last_conv(preact)[0] == "layer4.1.conv2" == activation_site(preact, "layer4.1.conv2")


def test_fp_needs_a_convolution(synthetic_backdoor):
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    with pytest.raises(RnpError, match="no torch.nn.Conv2d"):
        FP().fit(mlp, synthetic_backdoor.clean)
    with pytest.raises(RnpError, match="not an nn.Conv2d"):
        FP(layer="linear").fit(synthetic_backdoor.model, synthetic_backdoor.clean)


def test_nad_removes_the_backdoor_and_keeps_ca(nad_result, synthetic_backdoor):
    after = metrics(nad_result.model, synthetic_backdoor)
    assert after.clean_accuracy >= 0.95
    assert after.attack_success_rate <= 0.05
    distillation = nad_result.report["distillation"]
    assert distillation["layers"] == ["layer2", "layer3", "layer4"]
    losses = [row["attention_loss"] for row in distillation["per_epoch"]]
    assert losses[-1] < 0.5 * losses[0]
    assert nad_result.artifacts["teacher"] is not nad_result.model


def test_nad_layer_choice(synthetic_backdoor):
    assert stage_outputs(build_model("preact_resnet18", width=8), 3) == ["layer2", "layer3", "layer4"]
    vgg = build_model("vgg16", width=8)
    layers = stage_outputs(vgg, 3)
    assert len(layers) == 3 and all(isinstance(vgg.get_submodule(n), nn.Conv2d) for n in layers)
    with pytest.raises(RnpError, match="4-D"):
        NAD(layers=("linear",), betas=(1.0,)).fit(synthetic_backdoor.model, synthetic_backdoor.clean)


@pytest.mark.parametrize("defense", [FT, FP, NAD])
def test_input_model_is_untouched(defense, synthetic_backdoor):
    model = synthetic_backdoor.model
    state = copy.deepcopy(model.state_dict())
    result = defense(**TINY[defense]).fit(model, synthetic_backdoor.clean)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in state.items())
    assert result.model is not model and type(result.model) is type(model)
    assert not result.model.training and not model.training
    assert set(result.timings) and result.report["method"] == defense.name


@pytest.mark.parametrize("defense", [FT, FP, NAD])
def test_deterministic_per_seed(defense, synthetic_backdoor):
    def weights(seed):
        result = defense(**TINY[defense], seed=seed).fit(synthetic_backdoor.model, synthetic_backdoor.clean)
        return result.model.state_dict()

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)


@pytest.mark.parametrize("defense, settings", [
    (FT, {"epochs": 0}), (FT, {"lr": 0}), (FT, {"momentum": 1.0}), (FT, {"milestones": (5, 2)}),
    (FT, {"momentum": 0.0, "nesterov": True}), (FT, {"epochz": 3}),
    (FP, {"allowed_drop": -0.1}), (FP, {"max_prune_fraction": 0}), (FP, {"prune_step": 0}),
    (NAD, {"betas": ()}), (NAD, {"betas": (1.0, -1.0)}), (NAD, {"power": 0}),
    (NAD, {"teacher_epochs": 0}), (NAD, {"layers": ("layer4",)}),
])
def test_bad_config_is_an_rnp_error(defense, settings):
    with pytest.raises(RnpError):
        defense(**settings)
