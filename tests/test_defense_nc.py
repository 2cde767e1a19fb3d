"""Neural Cleanse: trigger recovery, the MAD anomaly index, unlearning, and the contracts.

The scan uses a reduced budget (60 steps of two batches of 16 per class instead of the
release's 1000 steps of 31 batches of 32); on the synthetic BadNets model it already recovers
the smallest trigger for the target class.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rnp.defenses.neural_cleanse import NeuralCleanse, NeuralCleanseConfig, stamp_clean_set
from rnp.detection import (TriggerReverseConfig, anomaly_indices, flag_classes,
                           reverse_engineer_trigger)
from rnp.errors import RnpError
from rnp.metrics import evaluate_backdoor
from rnp.utils import generator_for

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(steps=60, batch_size=16, samples_per_step=32)
TINY = dict(steps=3, batch_size=16, samples_per_step=16)


@pytest.fixture(scope="module")
def original_state(synthetic_backdoor):
    return {k: v.clone() for k, v in synthetic_backdoor.model.state_dict().items()}


@pytest.fixture(scope="module")
def result(synthetic_backdoor, original_state):
    return NeuralCleanse(**FAST, seed=0).fit(synthetic_backdoor.model, synthetic_backdoor.clean)


def test_the_target_has_the_smallest_trigger_and_the_largest_anomaly_index(result, synthetic_backdoor):
    """Over fixture seeds 0-4 (60 and 120 steps) the target's trigger was always the smallest.
    Whether its anomaly index passes 2 was not stable (0.80-5.87: the smooth synthetic classes
    have small natural triggers too, and on one seed the target's mask lay off the patch), so
    the flagging is checked as a rule here and measured on CIFAR-10 in the benchmarks."""
    report, target = result.report, synthetic_backdoor.target
    norms = torch.tensor(report["norms"])
    assert len(norms) == 10 and int(norms.argmin()) == target
    assert report["model_anomaly_index"] == report["anomaly_indices"][target]
    assert report["flagged"] == flag_classes(norms.double(), 2.0) == result.artifacts["flagged"]
    assert all(s >= 0.99 for s in report["attack_success"])


def test_artifacts_hold_masks_and_patterns_in_range(result):
    masks, patterns = result.artifacts["trigger_masks"], result.artifacts["trigger_patterns"]
    assert masks.shape == (10, 16, 16) and patterns.shape == (10, 3, 16, 16)
    assert 0 <= float(masks.min()) and float(masks.max()) <= 1
    assert 0 <= float(patterns.min()) and float(patterns.max()) <= 1
    norms = torch.tensor(result.report["norms"], dtype=torch.float64)
    assert torch.allclose(masks.sum((1, 2)).double(), norms)


def test_unlearning_the_targets_trigger_removes_the_backdoor(result, synthetic_backdoor):
    """Stage 3 on the target's recovered trigger: over fixture seeds 0-4, ASR 1.00 -> 0.00-0.03
    at CA 0.89-1.00."""
    b = synthetic_backdoor
    model = copy.deepcopy(b.model)
    defense = NeuralCleanse(**FAST, seed=0)
    unlearning = defense.unlearn(model, b.clean, [result.artifacts["triggers"][b.target]], torch.device("cpu"))
    after = evaluate_backdoor(model.eval(), b.test, b.triggered)
    assert evaluate_backdoor(b.model, b.test, b.triggered).attack_success_rate > 0.9
    assert after.attack_success_rate < 0.1
    assert after.clean_accuracy > 0.8
    assert unlearning["performed"] and unlearning["targets"] == [b.target]
    assert unlearning["stamped_images"] == 40 and len(unlearning["per_epoch"]) == 1


def test_result_contract(result):
    assert not result.model.training
    assert set(result.timings) == {"reverse", "detect", "unlearn"}
    assert result.report["unlearning"]["performed"] == bool(result.report["flagged"])


def test_input_model_is_untouched(result, synthetic_backdoor, original_state):
    model = synthetic_backdoor.model
    assert result.model is not model and not model.training
    assert all(torch.equal(v, original_state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_nothing_flagged_returns_the_model_unchanged(synthetic_backdoor):
    b = synthetic_backdoor
    result = NeuralCleanse(**TINY, anomaly_threshold=1e9).fit(b.model, b.clean)
    assert result.report["flagged"] == [] and not result.report["unlearning"]["performed"]
    assert "unchanged" in result.report["unlearning"]["note"]
    assert len(result.report["anomaly_indices"]) == 10
    assert result.model is not b.model
    expected = b.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in result.model.state_dict().items())


def test_deterministic_per_seed(synthetic_backdoor):
    b = synthetic_backdoor
    settings = dict(TINY, anomaly_threshold=0.01)
    first, second = (NeuralCleanse(**settings, seed=5).fit(b.model, b.clean) for _ in range(2))
    other = NeuralCleanse(**settings, seed=6).fit(b.model, b.clean)
    assert first.report["unlearning"]["performed"]
    assert first.report["norms"] == second.report["norms"] != other.report["norms"]
    assert torch.equal(first.artifacts["trigger_patterns"], second.artifacts["trigger_patterns"])
    state = second.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in first.model.state_dict().items())


def test_reverse_engineering_alone_leaves_the_model_as_it_was(synthetic_backdoor):
    b = synthetic_backdoor
    config = TriggerReverseConfig(**TINY)
    model = b.model
    model.train()
    try:
        found = reverse_engineer_trigger(model, b.clean, 3, config, generator=generator_for(0, "t"))
        assert model.training and all(p.requires_grad for p in model.parameters())
    finally:
        model.eval()
    again = reverse_engineer_trigger(model, b.clean, 3, config, generator=generator_for(0, "t"))
    assert found.target == 3 and found.steps == 3 and found.mask.shape == (16, 16)
    assert torch.equal(found.mask, again.mask) and found.norm == again.norm
    with pytest.raises(RnpError, match="not an output"):
        reverse_engineer_trigger(model, b.clean, 10, config, generator=generator_for(0, "t"))


def test_anomaly_index_arithmetic_on_hand_made_norms():
    # median of an even count is the mean of the middle two: (13 + 14) / 2 = 13.5;
    # absolute deviations 12.5, 3.5, 2.5, 1.5, .5, .5, 1.5, 2.5, 3.5, 4.5 have median 2.5
    norms = [1, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    indices = anomaly_indices(norms)
    assert indices[0] == pytest.approx(12.5 / (1.4826 * 2.5))
    assert indices[9] == pytest.approx(4.5 / (1.4826 * 2.5))
    assert flag_classes(norms) == [0]
    assert flag_classes(norms, threshold=4.0) == []


def test_only_classes_below_the_median_are_flagged():
    norms = [10, 11, 12, 13, 14, 15, 16, 17, 18, 100]
    assert anomaly_indices(norms)[9] > 20
    assert flag_classes(norms) == []
    # two small outliers, listed smallest norm first
    assert flag_classes([3, 1, 20, 21, 19, 20, 22, 18, 20, 21]) == [1, 0]


def test_zero_mad_gives_infinite_index_to_classes_off_the_median():
    assert anomaly_indices([5, 5, 5, 5, 1]).tolist() == [0, 0, 0, 0, math.inf]
    assert flag_classes([5, 5, 5, 5, 1]) == [4]


def test_stamping_keeps_labels_and_stamps_the_fraction(result, synthetic_backdoor):
    clean = synthetic_backdoor.clean
    trigger = result.artifacts["triggers"][0]
    stamped, count = stamp_clean_set(clean, [trigger], 0.2, generator_for(0, "s"))
    changed = (stamped.images != clean.images).flatten(1).any(1)
    assert count == 40 and 0 < int(changed.sum()) <= 40
    assert torch.equal(stamped.labels, clean.labels)


@pytest.mark.parametrize("settings", [
    dict(steps=0), dict(batch_size=0), dict(lr=0), dict(betas=(0.5,)), dict(betas=(0.5, 1.0)),
    dict(cost_multiplier=1.0), dict(attack_success_threshold=1.5), dict(anomaly_threshold=0),
    dict(unlearn_fraction=0), dict(unlearn_fraction=1.5), dict(unlearn_epochs=-1),
    dict(unlearn_lr=0), dict(no_such_setting=1),
])
def test_bad_config_raises(settings):
    with pytest.raises(RnpError):
        NeuralCleanse(**settings)


def test_defaults_are_the_published_ones():
    config = NeuralCleanseConfig()
    assert (config.steps, config.batch_size, config.lr, config.betas) == (1000, 32, 0.1, (0.5, 0.9))
    assert (config.init_cost, config.attack_success_threshold, config.patience) == (1e-3, 0.99, 5)
    assert (config.anomaly_threshold, config.unlearn_fraction, config.unlearn_epochs) == (2.0, 0.2, 1)
    assert NeuralCleanse.name == "nc"
