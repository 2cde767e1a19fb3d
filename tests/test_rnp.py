"""RNP's stages on tiny models: unlearning, recovering, pruning, the rules, and the contracts."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from helpers import assert_only_channels_zeroed, separable_image_set, tiny_cnn
from rnp import RNP, RNPConfig, utils
from rnp.data import ImageSet
from rnp.defenses import MaskSet, batchnorm_layers, prune_channels
from rnp.errors import RnpError
from rnp.metrics import accuracy
from rnp.models import build_model
from rnp.runs.folder import config_dict
from rnp.training import TrainConfig, predict, train
from rnp.utils import AMP_AUTO_VARIABLE, resolve_precision, uses_amp

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(batch_size=16, unlearn_epochs=8, recover_epochs=3)


@pytest.fixture(scope="module")
def clean():
    return separable_image_set(n=64, num_classes=4, size=8, seed=1)


@pytest.fixture(scope="module")
def trained(clean):
    """A tiny PreAct-ResNet18 that classifies the clean set well."""
    torch.manual_seed(0)
    model = build_model("preact_resnet18", num_classes=4, width=8)
    train(model, separable_image_set(n=256, num_classes=4, size=8), TrainConfig(epochs=10, lr=0.05),
          progress=False)
    assert accuracy(predict(model, clean), clean.labels) > 0.8  # 0.89-1.00 over fixture seeds 0-4
    return model


@pytest.fixture(scope="module")
def result(trained, clean):
    return RNP(**FAST, seed=3).fit(trained, clean)


def test_unlearning_stops_at_the_first_step_at_or_below_the_threshold(result):
    unlearning = result.report["unlearning"]
    accuracies = [step["accuracy"] for step in unlearning["per_step"]]
    assert unlearning["reached_threshold"]
    assert accuracies[-1] <= 0.2 and all(a > 0.2 for a in accuracies[:-1])


def test_unlearned_model_has_lost_its_clean_accuracy(result, clean, trained):
    before = accuracy(predict(trained, clean), clean.labels)
    after = accuracy(predict(result.unlearned_model, clean), clean.labels)
    assert after < before - 0.3


def test_epoch_check_runs_whole_epochs(trained, clean):
    result = RNP(preset="paper", **FAST).fit(trained, clean)
    unlearning = result.report["unlearning"]
    steps_per_epoch = len(clean) // FAST["batch_size"]
    assert unlearning["steps"] == unlearning["epochs"] * steps_per_epoch
    assert unlearning["per_epoch"][-1]["accuracy"] <= 0.2


def test_unreached_threshold_is_reported_and_the_last_epoch_used(trained, clean):
    result = RNP(**{**FAST, "unlearn_epochs": 1}, clean_threshold=0.0).fit(trained, clean)
    unlearning = result.report["unlearning"]
    assert not unlearning["reached_threshold"]
    assert "never fell" in unlearning["warning"]
    assert unlearning["epochs"] == 1


def test_masks_lie_in_unit_interval_one_per_batchnorm_channel(result, trained):
    channels = sum(m.num_features for _, m in batchnorm_layers(trained))
    assert len(result.masks) == channels
    assert result.masks.values.min() >= 0 and result.masks.values.max() <= 1
    assert (result.masks.values < 1).any()
    assert result.masks.to_csv().count("\n") == channels + 1


def test_recovery_trains_masks_only(trained, clean):
    defense = RNP(**FAST)
    unlearned = copy.deepcopy(trained)
    before = copy.deepcopy(unlearned.state_dict())
    defense.recover(unlearned, clean, "cpu")
    assert all(torch.equal(before[k], v) for k, v in unlearned.state_dict().items())


def test_pruning_zeroes_only_the_scale_of_pruned_channels_in_the_original(trained, clean):
    result = RNP(**FAST, prune_rule="number", prune_number=6).fit(trained, clean)
    pruned = result.report["pruning"]["channels"]
    assert len(pruned) == 6
    original, purified = trained.state_dict(), result.model.state_dict()
    zeroed = {(c["layer"], c["channel"]) for c in pruned}
    assert_only_channels_zeroed(original, purified, zeroed)


def test_input_model_is_never_modified(trained, clean):
    before = copy.deepcopy(trained.state_dict())
    trained.train()
    RNP(**FAST).fit(trained, clean)
    assert trained.training
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    assert not any("parametrizations" in k for k in trained.state_dict())


def test_same_seed_gives_identical_masks_and_another_seed_differs(trained, clean, result):
    again = RNP(**FAST, seed=3).fit(trained, clean)
    other = RNP(**FAST, seed=4).fit(trained, clean)
    assert torch.equal(again.masks.values, result.masks.values)
    assert not torch.equal(other.masks.values, result.masks.values)


def forward_dtypes(model: nn.Module) -> list[tuple[bool, torch.dtype]]:
    """Hooks the first convolution of ``model`` (the hook travels into RNP's copies) and
    returns the list it fills with (train mode, output dtype) for every forward pass."""
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda module, inputs, output: seen.append((module.training, output.dtype)))
    return seen


def test_amp_on_unlearns_and_recovers_in_bfloat16_and_still_prunes(trained, clean):
    model = copy.deepcopy(trained)
    seen = forward_dtypes(model)
    result = RNP(**FAST, seed=3, amp="on", recover_lr=0.2, ranking="masks", prune_rule="threshold",
                 threshold=0.95).fit(model, clean)
    optimising = {dtype for training, dtype in seen if training}
    assert optimising == {torch.bfloat16}
    assert {dtype for training, dtype in seen if not training} == {torch.float32}  # the pruning rule
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert result.masks.values.dtype == torch.float32
    assert 0 < result.report["pruning"]["pruned"] < len(result.masks)
    assert result.report["unlearning"]["reached_threshold"]
    # the report holds the config as it ran: channels-last followed bfloat16 on the CPU
    assert result.report["config"]["amp"] == "on" and result.report["config"]["channels_last"] is True


def test_the_default_follows_the_auto_rule_and_the_paper_preset_stays_float32(monkeypatch):
    monkeypatch.delenv(AMP_AUTO_VARIABLE)  # the rule as on a user's CPU with native bfloat16
    monkeypatch.setattr(utils, "fast_bfloat16_cpu", lambda: True)
    assert RNPConfig().amp == "auto" and uses_amp(RNPConfig().amp, "cpu")
    assert config_dict(resolve_precision(RNPConfig(), "cpu"))["amp"] == "on"
    for paper in (RNPConfig.paper(), RNP(preset="paper").config):  # the official code is float32
        assert paper.amp == "off" and resolve_precision(paper, "cpu") == dataclasses.replace(paper, channels_last=False)
    assert RNPConfig.paper(amp="auto").amp == "auto"
    # a float32 RNP config is recorded (and keys grid cells) as before amp existed
    monkeypatch.setattr(utils, "fast_bfloat16_cpu", lambda: False)
    for float32 in (RNPConfig(), RNPConfig(amp="off", channels_last=False)):
        assert not {"amp", "channels_last"} & set(config_dict(resolve_precision(float32, "cpu")))


def test_amp_off_is_the_float32_result_bit_for_bit(trained, clean, result):
    model = copy.deepcopy(trained)
    seen = forward_dtypes(model)
    off = RNP(**FAST, seed=3, amp="off").fit(model, clean)
    assert {dtype for _, dtype in seen} == {torch.float32}
    assert torch.equal(off.masks.values, result.masks.values)
    assert torch.equal(off.artifacts["order"], result.artifacts["order"])
    assert off.report["unlearning"]["per_step"] == result.report["unlearning"]["per_step"]
    assert all(torch.equal(v, result.model.state_dict()[k]) for k, v in off.model.state_dict().items())


def test_threshold_sets_the_pruned_count(trained, clean):
    counts = []
    for threshold in (0.5, 0.95):
        result = RNP(**FAST, recover_lr=0.2, ranking="masks", prune_rule="threshold",
                     threshold=threshold).fit(trained, clean)
        assert result.report["pruning"]["pruned"] == int((result.masks.values <= threshold).sum())
        counts.append(result.report["pruning"]["pruned"])
    assert counts[0] < counts[1]


def test_number_rule_prunes_the_lowest_masks(trained, clean):
    result = RNP(**FAST, ranking="masks", prune_rule="number", prune_number=5).fit(trained, clean)
    values = sorted(c["mask"] for c in result.report["pruning"]["channels"])
    assert len(values) == 5
    assert values[-1] <= torch.sort(result.masks.values).values[5]


def test_auto_rule_keeps_clean_set_accuracy_within_tolerance(result, clean):
    pruning = result.report["pruning"]
    assert pruning["rule"] == "auto"
    assert pruning["clean_accuracy_after"] >= pruning["clean_accuracy_before"] - 0.02
    assert pruning["pruned"] <= 0.05 * pruning["total_channels"]
    assert accuracy(predict(result.model, clean), clean.labels) == pytest.approx(pruning["clean_accuracy_after"])


def test_gradient_tie_break_orders_equal_masks_by_push(trained, clean):
    result = RNP(**FAST, recover_lr=0.5, ranking="masks", tie_break="gradient").fit(trained, clean)
    order = result.artifacts["order"]
    values = result.masks.values[order]
    assert torch.all(values[1:] >= values[:-1])


def test_paper_preset_is_the_published_recipe():
    config = RNP(preset="paper").config
    assert (config.stop_check, config.recover_lr, config.tie_break, config.ranking, config.prune_rule,
            config.threshold) == ("epoch", 0.2, "index", "masks", "threshold", 0.2)
    assert (config.unlearn_lr, config.unlearn_momentum, config.unlearn_weight_decay,
            config.unlearn_milestones, config.clean_threshold, config.alpha) == (0.01, 0.9, 5e-4, (10, 20), 0.2, 0.2)
    assert RNP(preset="paper", threshold=0.3).config.threshold == 0.3


def test_batchnorm_masks_on_a_model_without_batchnorm_are_refused_naming_its_layers(clean):
    with pytest.raises(RnpError, match="Conv2d"):
        RNP(**FAST, mask_layers="batchnorm").fit(tiny_cnn(num_classes=4), clean)


def test_masks_attach_to_any_module_with_batchnorm():
    class UserNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    for model in (UserNet(), tiny_cnn(batch_norm=True)):
        x = torch.rand(4, 3, 8, 8)
        model.eval()
        expected = model(x)
        masks = MaskSet(model)
        assert torch.allclose(model(x), expected)
        with torch.no_grad():
            masks.parameters[0][0] = 0.5
        scale = masks.layers[0][1]
        assert torch.allclose(scale.weight[0], 0.5 * scale.parametrizations.weight.original[0])


def test_prune_channels_keeps_beta_and_running_statistics():
    model = tiny_cnn(batch_norm=True)
    bn = model[1]
    bn.bias.data.fill_(0.3)
    scores = MaskSet(copy.deepcopy(model)).scores()
    prune_channels(model, scores, [1, 2])
    assert bn.weight[1] == 0 and bn.weight[2] == 0 and bn.weight[0] != 0
    assert torch.all(bn.bias == 0.3) and torch.all(bn.running_var == 1)


def test_bad_inputs_are_refused(trained, clean):
    with pytest.raises(RnpError, match="at least"):
        RNP(**FAST).fit(trained, clean.subset(range(5)))
    six_classes = ImageSet(clean.images, torch.full_like(clean.labels, 5), tuple("abcdef"))
    with pytest.raises(RnpError, match="label 5"):
        RNP(**FAST).fit(trained, six_classes)
    with pytest.raises(RnpError):
        RNPConfig(prune_rule="median")
    with pytest.raises(RnpError, match="amp"):
        RNPConfig(amp="bf16")
    with pytest.raises(RnpError):
        RNP(preset="fast")
