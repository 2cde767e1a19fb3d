"""CA, CA on non-target images, ASR, RA and DER on a model whose every prediction is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rnp.attacks import BadNets
from rnp.data.images import ImageSet
from rnp.errors import RnpError
from rnp.metrics import (BackdoorMetrics, accuracy, anomaly_indices, der, evaluate_backdoor, false_alarm_interval,
                         share_above, threshold_at_fpr)

LABELS = [0, 1, 2] * 4
# The class each image's pixels encode: the true label except image 2 (reads as 0) and 4 (as 2).
ENCODED = [0, 1, 0, 0, 2, 2, 0, 1, 2, 0, 1, 2]


class ScriptedModel(nn.Module):
    """Predicts the class encoded in the top-left pixel (value 40 (c + 1)); a bright bottom-right
    pixel (the trigger) switches the prediction to class 0, except for images encoding class 2,
    which the backdoor does not reach."""

    def forward(self, x):
        encoded = (x[:, 0, 0, 0] * 255 / 40).round().long() - 1
        triggered = x[:, 0, -1, -1] > 0.9
        prediction = torch.where(triggered & (encoded != 2), torch.zeros_like(encoded), encoded)
        return nn.functional.one_hot(prediction, 3).float()


def scripted_test_set() -> ImageSet:
    values = torch.tensor([40 * (c + 1) for c in ENCODED], dtype=torch.uint8)
    images = values[:, None, None, None].expand(12, 3, 8, 8).clone()
    return ImageSet(images, torch.tensor(LABELS), ("zero", "one", "two"))


@pytest.mark.parametrize("batch_size", [512, 5])
def test_metrics_all2one_have_the_exact_values(batch_size):
    test = scripted_test_set()
    triggered = BadNets(target=0, patch="white", size=1).triggered_test(test)
    metrics = evaluate_backdoor(ScriptedModel(), test, triggered, batch_size=batch_size)
    assert metrics.clean_accuracy == pytest.approx(10 / 12)
    assert metrics.clean_accuracy_non_target == pytest.approx(6 / 8)
    assert metrics.attack_success_rate == pytest.approx(4 / 8)
    assert metrics.robust_accuracy == pytest.approx(3 / 8)


def test_metrics_all2all_have_the_exact_values():
    test = scripted_test_set()
    triggered = BadNets(mode="all2all", patch="white", size=1).triggered_test(test)
    metrics = evaluate_backdoor(ScriptedModel(), test, triggered)
    assert metrics.clean_accuracy == pytest.approx(10 / 12)
    assert metrics.clean_accuracy_non_target == pytest.approx(10 / 12)
    assert metrics.attack_success_rate == pytest.approx(2 / 12)
    assert metrics.robust_accuracy == pytest.approx(7 / 12)


def test_metrics_without_triggered_set_give_clean_accuracy_only():
    metrics = evaluate_backdoor(ScriptedModel(), scripted_test_set())
    assert metrics == BackdoorMetrics(clean_accuracy=pytest.approx(10 / 12))
    assert metrics.attack_success_rate is None and metrics.robust_accuracy is None
    assert set(metrics.to_dict()) == {"clean_accuracy", "clean_accuracy_non_target",
                                      "attack_success_rate", "robust_accuracy"}


def test_accuracy():
    assert accuracy(torch.tensor([1, 2, 3, 0]), torch.tensor([1, 2, 0, 0])) == 0.75
    assert accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) == 0.0


def metrics(ca: float, asr: float) -> BackdoorMetrics:
    return BackdoorMetrics(clean_accuracy=ca, attack_success_rate=asr)


@pytest.mark.parametrize("before, after, expected", [
    (metrics(0.90, 1.00), metrics(0.85, 0.05), 0.95),   # (0.95 - 0.05 + 1) / 2
    (metrics(0.90, 1.00), metrics(0.90, 0.00), 1.00),   # perfect defense
    (metrics(1.00, 0.50), metrics(0.00, 0.50), 0.00),   # ASR kept, CA destroyed
    (metrics(0.80, 0.90), metrics(0.85, 0.10), 0.90),   # a CA gain is clamped to no loss
    (metrics(0.90, 0.20), metrics(0.70, 0.50), 0.40),   # an ASR rise is clamped to no drop
    (metrics(0.90, 0.95), metrics(0.90, 0.95), 0.50),   # nothing changed
])
def test_der(before, after, expected):
    assert der(before, after) == pytest.approx(expected)


def test_share_above_counts_only_scores_strictly_above():
    assert share_above([0.1, 0.5, 0.5, 0.9], 0.5) == 0.25
    assert share_above(torch.tensor([1.0, 2.0], dtype=torch.float32), 0.0) == 1.0


def test_anomaly_indices_floor_the_spread():
    shares = [0.1] * 9 + [0.2]  # MAD 0: without a floor the outlier's index is infinite
    assert anomaly_indices(shares)[-1] == float("inf")
    assert anomaly_indices(shares, min_spread=0.05)[-1].item() == pytest.approx(2.0)



@pytest.mark.parametrize("negatives", [1, 19, 200])
def test_false_alarm_interval_of_the_highest_negative_has_its_closed_form(negatives):
    # at fpr 0 the threshold is the highest negative: its rate is Beta(1, n), P(rate <= q) = 1 - (1 - q)^n
    low, high = false_alarm_interval(negatives, 0.0, confidence=0.9)
    assert low == pytest.approx(1 - 0.95 ** (1 / negatives), rel=1e-9)
    assert high == pytest.approx(1 - 0.05 ** (1 / negatives), rel=1e-9)


@pytest.mark.parametrize("negatives, fpr", [(100, 0.05), (40, 0.2)])
def test_false_alarm_interval_holds_the_rate_thresholds_realise(negatives, fpr):
    # uniform scores: a threshold t flags the share 1 - t of the population; draw many thresholds
    draws = torch.rand(20000, negatives, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rates = torch.tensor([1 - threshold_at_fpr(row, fpr) for row in draws], dtype=torch.float64)
    low, high = false_alarm_interval(negatives, fpr)
    # each tail holds 2.5% of 20,000 draws (sd 0.11 points); an off-by-one rank moves a tail by 1-2 points
    assert float((rates < low).double().mean()) == pytest.approx(0.025, abs=0.005)
    assert float((rates > high).double().mean()) == pytest.approx(0.025, abs=0.005)


def test_false_alarm_interval_edges():
    assert false_alarm_interval(5, 1.0) == (1.0, 1.0)
    with pytest.raises(RnpError, match="confidence"):
        false_alarm_interval(100, 0.05, confidence=1.0)
    with pytest.raises(RnpError, match="at least one negative"):
        false_alarm_interval(0, 0.05)
