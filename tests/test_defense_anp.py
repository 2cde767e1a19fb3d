"""ANP on the synthetic BadNets backdoor: the perturbation, the masks, the pruning rules and
the contracts every defense keeps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_only_channels_zeroed, tiny_cnn
from rnp.defenses.anp import ANP, ANPConfig, NeuronPerturbations
from rnp.defenses.masks import batchnorm_layers, channels_pruned
from rnp.errors import RnpError
from rnp.metrics import evaluate_backdoor
from rnp.utils import generator_for

pytestmark = pytest.mark.usefixtures("one_thread")

# A short run of the paper's optimisation (lr 0.2, momentum 0.9, eps 0.4, alpha 0.2). The
# synthetic model was trained without augmentation, so none here either. After 80 iterations
# instead of 2000 the backdoor masks have only fallen to about 0.7, hence the threshold.
FAST = dict(iterations=80, batch_size=64, augment=False)
SHORT = dict(iterations=8, batch_size=64, augment=False)


@pytest.fixture(scope="module")
def result(synthetic_backdoor):
    return ANP(**FAST, threshold=0.7, seed=0).fit(synthetic_backdoor.model, synthetic_backdoor.clean)


def test_anp_ranks_the_backdoor_channels_lowest(result, synthetic_backdoor):
    """Pruning the 40 lowest-mask channels (8% of 488) removes the backdoor and keeps clean
    accuracy: over fixture seeds 0-4, ASR 0.00-0.03 at CA 0.88-0.99. Which threshold reaches that
    point after this short run varies from seed to seed (at 0.7: ASR 0.00-0.42, CA 0.89-1.00), so
    the threshold rule's outcome is a benchmark question; its mechanics are tested below."""
    test, triggered = synthetic_backdoor.test, synthetic_backdoor.triggered
    before = evaluate_backdoor(synthetic_backdoor.model, test, triggered)
    assert before.attack_success_rate > 0.95 and before.clean_accuracy > 0.95
    scores = result.masks
    with channels_pruned(synthetic_backdoor.model, scores, scores.order()[:40]) as pruned:
        after = evaluate_backdoor(pruned, test, triggered)
    assert after.attack_success_rate < 0.15
    assert after.clean_accuracy > 0.8


def test_without_perturbation_the_masks_stay_high_and_the_backdoor_stays(synthetic_backdoor):
    """eps = 0 leaves only alpha * CE: nothing pushes the backdoor masks down."""
    result = ANP(**FAST, threshold=0.7, eps=0.0).fit(synthetic_backdoor.model, synthetic_backdoor.clean)
    after = evaluate_backdoor(result.model, synthetic_backdoor.test, synthetic_backdoor.triggered)
    assert result.report["pruning"]["pruned"] == 0
    assert after.attack_success_rate > 0.95


def test_the_inner_step_raises_the_loss_above_its_random_start(synthetic_backdoor):
    model = copy.deepcopy(synthetic_backdoor.model).train()
    neurons = NeuronPerturbations(model)
    images = synthetic_backdoor.clean.images[:64].float() / 255
    labels = synthetic_backdoor.clean.labels[:64]

    def perturbed_loss():
        with torch.no_grad(), neurons.perturbed():
            return float(F.cross_entropy(model(images), labels))

    neurons.randomise_(0.4, generator_for(5, "test"))
    random_start = perturbed_loss()
    ANP().perturb(model, neurons, images, labels, generator_for(5, "test"))
    assert perturbed_loss() > random_start + 0.1
    assert all(value.abs().max() <= 0.4 for value in neurons.perturbations)


def test_perturbation_is_added_to_the_mask_and_scales_the_shift():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    bn = model[1]
    gamma, beta = torch.rand(4) + 0.5, torch.rand(4) + 0.5
    bn.weight.data.copy_(gamma)
    bn.bias.data.copy_(beta)
    neurons = NeuronPerturbations(model)
    with torch.no_grad():
        neurons.masks[0].copy_(torch.tensor([1.0, 0.5, 0.0, 0.2]))
        neurons.perturbations[0].fill_(0.3)
        neurons.perturbations[1].fill_(-0.25)
    assert torch.allclose(bn.weight, gamma * torch.tensor([1.0, 0.5, 0.0, 0.2]))
    assert torch.allclose(bn.bias, beta)
    with neurons.perturbed():
        assert torch.allclose(bn.weight, gamma * torch.tensor([1.3, 0.8, 0.3, 0.5]))
        assert torch.allclose(bn.bias, beta * 0.75)
    assert torch.allclose(bn.weight, gamma * torch.tensor([1.0, 0.5, 0.0, 0.2]))


def test_pruned_channels_have_zero_scale_and_everything_else_is_the_original(result, synthetic_backdoor):
    pruning = result.report["pruning"]
    original = synthetic_backdoor.model.state_dict()
    purified = result.model.state_dict()
    zeroed = {(c["layer"], c["channel"]) for c in pruning["channels"]}
    assert len(zeroed) == pruning["pruned"] > 0
    assert_only_channels_zeroed(original, purified, zeroed)
    assert not result.model.training
    assert type(result.model) is type(synthetic_backdoor.model)


def test_threshold_rule_prunes_every_mask_at_or_below_it(result):
    masks = result.masks.values
    pruning = result.report["pruning"]
    assert pruning["rule"] == "threshold"
    assert pruning["pruned"] == int((masks <= 0.7).sum())
    assert all(c["value"] <= 0.7 for c in pruning["channels"])
    assert len(masks) == pruning["total_channels"] == sum(
        m.num_features for _, m in batchnorm_layers(result.artifacts["original_model"]))
    assert masks.min() >= 0 and masks.max() <= 1
    assert result.artifacts["masks"].to_csv().count("\n") == len(masks) + 1


def test_higher_threshold_prunes_at_least_as_many(synthetic_backdoor):
    counts = []
    for threshold in (0.9, 0.97, 1.0):
        result = ANP(**SHORT, threshold=threshold).fit(synthetic_backdoor.model, synthetic_backdoor.clean)
        assert result.report["pruning"]["pruned"] == int((result.masks.values <= threshold).sum())
        counts.append(result.report["pruning"]["pruned"])
    assert counts[0] <= counts[1] < counts[2] == len(result.masks)


def test_number_rule_prunes_exactly_that_many_lowest_masks(synthetic_backdoor):
    result = ANP(**SHORT, prune_by="number", prune_number=7).fit(synthetic_backdoor.model,
                                                                 synthetic_backdoor.clean)
    pruned = result.report["pruning"]["channels"]
    assert result.report["pruning"]["pruned"] == len(pruned) == 7
    assert max(c["value"] for c in pruned) <= torch.sort(result.masks.values).values[7]
    zeros = sum(int((m.weight == 0).sum()) for _, m in batchnorm_layers(result.model))
    assert zeros == 7 + sum(int((m.weight == 0).sum()) for _, m in batchnorm_layers(synthetic_backdoor.model))


def test_input_model_is_never_modified(synthetic_backdoor):
    model = copy.deepcopy(synthetic_backdoor.model).train()
    before = copy.deepcopy(model.state_dict())
    ANP(**SHORT).fit(model, synthetic_backdoor.clean)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("parametrizations" in k for k in model.state_dict())


def test_same_seed_gives_identical_masks_and_another_seed_differs(synthetic_backdoor):
    runs = [ANP(**SHORT, seed=seed).fit(synthetic_backdoor.model, synthetic_backdoor.clean)
            for seed in (3, 3, 4)]
    assert torch.equal(runs[0].masks.values, runs[1].masks.values)
    assert runs[0].report["optimization"] == runs[1].report["optimization"]
    assert not torch.equal(runs[0].masks.values, runs[2].masks.values)


def test_defaults_are_the_published_ones():
    config = ANPConfig()
    assert (config.iterations, config.batch_size, config.lr, config.momentum) == (2000, 128, 0.2, 0.9)
    assert (config.eps, config.steps, config.ascent_step, config.alpha) == (0.4, 1, 0.4, 0.2)
    assert (config.prune_by, config.threshold, config.augment) == ("threshold", 0.2, True)
    assert ANPConfig(steps=4).ascent_step == 0.1 and ANPConfig(step_scale=0.5).ascent_step == 0.2


@pytest.mark.parametrize("settings", [dict(prune_by="median"), dict(eps=-0.1), dict(alpha=1.5),
                                      dict(iterations=0), dict(steps=0), dict(threshold=2.0),
                                      dict(prune_number=-1), dict(momentum=1.0), dict(lr=0.0),
                                      dict(step_scale=0.0), dict(mask_lr=0.1),
                                      dict(mask_layers="dense")])
def test_bad_settings_are_refused(settings):
    with pytest.raises(RnpError):
        ANP(**settings)


def test_model_without_the_requested_layers_is_refused(synthetic_backdoor):
    with pytest.raises(RnpError, match="batchnorm.*Conv2d"):
        ANP(**SHORT, mask_layers="batchnorm").fit(tiny_cnn(num_classes=10), synthetic_backdoor.clean)
    with pytest.raises(RnpError, match="layer types found: Flatten x1, Linear x1"):
        ANP(**SHORT).fit(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)), synthetic_backdoor.clean)


def test_model_without_batchnorm_gets_convolution_channels(synthetic_backdoor):
    model = tiny_cnn(num_classes=10, width=4)
    result = ANP(**SHORT, prune_by="number", prune_number=1).fit(model, synthetic_backdoor.clean)
    assert result.masks.layer_names == ("0",) and len(result.masks) == 4
    channel = result.report["pruning"]["channels"][0]["channel"]
    assert torch.all(result.model[0].weight[channel] == 0)
    assert torch.equal(result.model[0].bias, model[0].bias)


def test_convolution_perturbation_acts_on_output_channels():
    conv = nn.Conv2d(3, 2, 3)
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    neurons = NeuronPerturbations(nn.Sequential(conv, nn.Flatten(), nn.Linear(2, 2)), "conv")
    with torch.no_grad():
        neurons.masks[0].copy_(torch.tensor([0.0, 1.0]))
        neurons.perturbations[0].copy_(torch.tensor([0.4, -0.4]))
        neurons.perturbations[1].copy_(torch.tensor([0.1, -0.2]))
    with neurons.perturbed():
        assert torch.allclose(conv.weight, weight * torch.tensor([0.4, 0.6]).view(2, 1, 1, 1))
        assert torch.allclose(conv.bias, bias * torch.tensor([1.1, 0.8]))
