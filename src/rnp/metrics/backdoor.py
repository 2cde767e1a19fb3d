"""Clean accuracy (CA), attack success rate (ASR), robust accuracy (RA) and DER.

Definitions (fractions in [0, 1]):

- ``clean_accuracy``: top-1 accuracy on the whole clean test set.
- ``clean_accuracy_non_target``: the same on the test images whose true label is not the
  target (for all-to-one attacks); this is the "CleanACC" of the official RNP code, which drops
  target-class images, so compare with it when comparing with the paper.
- ``attack_success_rate``: triggered non-target test images classified as the attacker's label.
- ``robust_accuracy``: the same triggered images classified as their true label.
- ``der`` (defense effectiveness rating, BackdoorBench): ``(max(0, dASR) - max(0, dCA) + 1) / 2``
  where ``dASR = ASR_before - ASR_after`` and ``dCA = CA_before - CA_after``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from rnp.data.images import ImageSet
from rnp.data.poisoned import TriggeredSet
from rnp.models.checks import check_finite_weights
from rnp.training.evaluate import predict
from rnp.utils import model_device


@dataclass(frozen=True)
class BackdoorMetrics:
    clean_accuracy: float
    clean_accuracy_non_target: float | None = None
    attack_success_rate: float | None = None
    robust_accuracy: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions equal to the labels (0.0 for an empty set)."""
    return float((predictions == labels).float().mean()) if len(labels) else 0.0


def evaluate_backdoor(model: nn.Module, test: ImageSet, triggered: TriggeredSet | None = None, *,
                      batch_size: int = 512, device=None) -> BackdoorMetrics:
    """Measures CA on ``test`` and, given the triggered test set, CA on non-target images,
    ASR and RA, on ``device`` (default: where the model's parameters are).

    A model with non-finite weights or outputs is an :class:`RnpError`, not an evaluation: the
    argmax of NaN scores names some class, which once read as an attack success rate of 100%.
    """
    check_finite_weights(model)
    device = model_device(model) if device is None else device
    predictions = predict(model, test, batch_size=batch_size, device=device)
    clean = accuracy(predictions, test.labels)
    if triggered is None:
        return BackdoorMetrics(clean)
    source = triggered.source_indices
    triggered_predictions = predict(model, triggered.data, batch_size=batch_size, device=device)
    return BackdoorMetrics(
        clean_accuracy=clean,
        clean_accuracy_non_target=accuracy(predictions[source], test.labels[source]),
        attack_success_rate=accuracy(triggered_predictions, triggered.target_labels),
        robust_accuracy=accuracy(triggered_predictions, triggered.data.labels),
    )


def der(before: BackdoorMetrics, after: BackdoorMetrics) -> float:
    """Defense effectiveness rating of ``after`` (the defended model) against ``before``."""
    drop_asr = before.attack_success_rate - after.attack_success_rate
    drop_ca = before.clean_accuracy - after.clean_accuracy
    return (max(0.0, drop_asr) - max(0.0, drop_ca) + 1) / 2
