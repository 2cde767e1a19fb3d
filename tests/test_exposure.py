"""What RNP's unlearned model exposes: target label, backdoored-model score, exposure-guided FP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnp.detection
from rnp.defenses import FP, RNP, ExposedFP, RNPConfig
from rnp.detection.exposure import (Exposure, detect_backdoored_model, detect_target_label, expose, expose_runs,
                                   run_summaries)
from rnp.detection.poisoned_samples import LossScore, UnlearnedMargin
from rnp.errors import RnpError
from rnp.metrics import auroc, evaluate_backdoor, positives_mask, threshold_at_fpr

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exposure(synthetic_backdoor):
    return expose(synthetic_backdoor.model, synthetic_backdoor.clean)


class Constant(nn.Module):
    """Predicts ``cls`` for every image (or the image's own class pattern when ``cls`` is None)."""

    def __init__(self, cls, classes=10):
        super().__init__()
        self.cls, self.classes = cls, classes
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        logits = torch.zeros(len(images), self.classes) + self.weight
        index = torch.full((len(images),), self.cls) if self.cls is not None else \
            torch.arange(len(images)) % self.classes
        logits[torch.arange(len(images)), index] = 1.0
        return logits


def test_unlearning_records_every_steps_predictions(exposure, synthetic_backdoor):
    counts = exposure.prediction_counts
    assert counts.shape == (exposure.unlearning["steps"], 10)
    batch = 128
    expected = [min(batch, len(synthetic_backdoor.clean) - (s % 2) * batch) for s in range(len(counts))]
    assert counts.sum(1).tolist() == expected
    assert exposure.unlearned is not exposure.original


def test_input_model_is_untouched(synthetic_backdoor):
    before = {k: v.clone() for k, v in synthetic_backdoor.model.state_dict().items()}
    expose(synthetic_backdoor.model, synthetic_backdoor.clean)
    assert all(torch.equal(v, before[k]) for k, v in synthetic_backdoor.model.state_dict().items())


def test_the_target_is_where_the_predictions_drift(synthetic_backdoor):
    """On the synthetic backdoor the drift's top class is the target for every unlearning seed.
    Whether it stands out enough to be named (confidence >= 2) was not stable: over fixture seeds
    0-4 and unlearning seeds 0-2 the confidence ran from 1.12 to 4.96, and a clean model reached
    4.00 on one fixture seed, so naming is measured on CIFAR-10 in the exposure benchmark."""
    for seed in range(3):
        found = detect_target_label(expose(synthetic_backdoor.model, synthetic_backdoor.clean, seed=seed))
        assert found.candidate == synthetic_backdoor.target, seed


def test_repeated_unlearnings_draw_their_own_images_and_seeds(synthetic_backdoor):
    clean = synthetic_backdoor.clean
    runs = expose_runs(synthetic_backdoor.model, clean, 3, 0.5, seed=4)
    assert [len(e.clean) for e in runs] == [round(len(clean) / 2)] * 3
    assert len({e.clean.images[:8].sum().item() for e in runs}) == 3  # three draws of the images
    again = expose_runs(synthetic_backdoor.model, clean, 3, 0.5, seed=4)
    assert all(torch.equal(a.prediction_counts, b.prediction_counts) for a, b in zip(runs, again))
    summaries = run_summaries(runs, clean)
    assert [s["candidate"] for s in summaries] == [int(e.drift_shares().argmax()) for e in runs]
    assert all(sum(map(sum, s["confusion"])) == len(clean) for s in summaries)


def test_repeated_unlearnings_take_a_config_and_give_each_run_its_seed(synthetic_backdoor):
    clean = synthetic_backdoor.clean
    with_config = expose_runs(synthetic_backdoor.model, clean, 2, 0.5, RNPConfig(unlearn_lr=0.02, seed=9), seed=4)
    with_keywords = expose_runs(synthetic_backdoor.model, clean, 2, 0.5, seed=4, unlearn_lr=0.02)
    assert all(torch.equal(a.prediction_counts, b.prediction_counts) for a, b in zip(with_config, with_keywords))


@pytest.mark.parametrize("runs, subset, message", [(0, 0.5, "runs takes integers"), (2, 0.0, "subset is a share"),
                                                   (2, 1.5, "subset is a share")])
def test_repeated_unlearnings_refuse_bad_settings(synthetic_backdoor, runs, subset, message):
    with pytest.raises(RnpError, match=message):
        expose_runs(synthetic_backdoor.model, synthetic_backdoor.clean, runs, subset)


def test_threshold_decides_whether_the_candidate_is_named(exposure):
    found = detect_target_label(exposure)
    assert detect_target_label(exposure, threshold=found.confidence + 0.01).target is None
    assert detect_target_label(exposure, threshold=found.confidence - 0.01).target == found.candidate


def test_drift_weights_later_steps_more(exposure):
    counts = torch.tensor([[10, 0], [0, 10]])
    shaped = Exposure(exposure.original, exposure.unlearned, exposure.clean, {}, counts, 0.0)
    assert shaped.drift_shares().tolist() == pytest.approx([1 / 3, 2 / 3])


def test_variance_score_of_collapsed_and_spread_predictions(synthetic_backdoor):
    clean = synthetic_backdoor.clean
    collapsed = Exposure(Constant(3), Constant(3), clean, {}, torch.zeros(1, 10), 0.0)
    spread = Exposure(Constant(3), Constant(None), clean, {}, torch.zeros(1, 10), 0.0)
    assert detect_backdoored_model(collapsed).score == pytest.approx(0.09)
    assert detect_backdoored_model(collapsed).backdoored
    assert detect_backdoored_model(spread).score == pytest.approx(0.0)
    assert not detect_backdoored_model(spread).backdoored


def test_calibrated_threshold_keeps_the_false_positive_rate():
    scores = [0.001 * i for i in range(1, 21)]
    assert sum(s > threshold_at_fpr(scores, 0.05) for s in scores) == 1
    assert not any(s > threshold_at_fpr(scores, 0.0) for s in scores)
    assert all(s > threshold_at_fpr(scores, 1.0) for s in scores)  # calibrate_threshold flagged none
    assert not hasattr(rnp.detection, "calibrate_threshold")  # one calibration, in rnp.metrics
    for fpr in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(RnpError, match="fpr must be a number in"):
            threshold_at_fpr(scores, fpr)
    with pytest.raises(RnpError):
        threshold_at_fpr([], 0.05)


def test_exposure_from_an_rnp_run_matches_a_fresh_one(synthetic_backdoor):
    result = RNP(recover_epochs=1).fit(synthetic_backdoor.model, synthetic_backdoor.clean)
    reused = Exposure.from_rnp(result, synthetic_backdoor.clean)
    fresh = expose(synthetic_backdoor.model, synthetic_backdoor.clean)
    assert torch.equal(reused.prediction_counts, fresh.prediction_counts)
    assert detect_target_label(reused) == detect_target_label(fresh)


def test_unlearned_margin_ranks_poisoned_samples_first(exposure, synthetic_backdoor):
    """The fixture's own poisoned training set: the unlearned model's margin separates the
    poisoned samples better than the original model's loss does (measured 0.94 vs 0.77)."""
    poisoned = synthetic_backdoor.poisoned
    positives = positives_mask(poisoned.poisoned_indices, len(poisoned.data))
    scores = UnlearnedMargin().score(synthetic_backdoor.model, poisoned.data, exposure=exposure)
    baseline = LossScore().score(synthetic_backdoor.model, poisoned.data)
    assert auroc(scores, positives) > 0.9 > auroc(baseline, positives)
    assert scores[positives].mean() > scores[~positives].mean() + 3
    fresh = UnlearnedMargin().score(synthetic_backdoor.model, poisoned.data, synthetic_backdoor.clean)
    assert torch.equal(fresh, scores)


@pytest.fixture(scope="module")
def exposed_fp(synthetic_backdoor):
    return ExposedFP(epochs=2).fit(synthetic_backdoor.model, synthetic_backdoor.clean)


def test_exposed_fp_prunes_in_rnp_mask_order(exposed_fp, synthetic_backdoor):
    masks, order = exposed_fp.artifacts["masks"], exposed_fp.artifacts["order"]
    pruning = exposed_fp.report["pruning"]
    assert pruning["ranking"] == "rnp_masks" and pruning["pruned"] > 0
    values = masks.values[order]
    assert bool((values[1:] >= values[:-1]).all())
    pruned = order[:pruning["pruned"]]
    state = exposed_fp.model.state_dict()
    for layer, channel in zip(masks.layers[pruned].tolist(), masks.channels[pruned].tolist()):
        assert state[f"{masks.layer_names[layer]}.weight"][channel] == 0
    after = evaluate_backdoor(exposed_fp.model, synthetic_backdoor.test, synthetic_backdoor.triggered)
    assert after.clean_accuracy > 0.6  # whether the backdoor goes follows RNP's ranking: see test_end_to_end


def test_exposed_fp_keeps_fp_stopping_rule(synthetic_backdoor, exposed_fp):
    tighter = ExposedFP(epochs=1, allowed_drop=0.0).fit(synthetic_backdoor.model, synthetic_backdoor.clean)
    assert tighter.report["pruning"]["pruned"] < exposed_fp.report["pruning"]["pruned"]
    plain = FP(epochs=1).fit(synthetic_backdoor.model, synthetic_backdoor.clean)
    assert "ranking" not in plain.report["pruning"] and "activations" in plain.artifacts


def test_exposed_fp_rejects_unknown_mask_layers():
    with pytest.raises(RnpError):
        ExposedFP(mask_layers="attention")
