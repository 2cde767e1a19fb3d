"""The combined sample scan: conformal p-values against the defender's clean images, their
combination, the cross-fitting, and the flag's false-positive rate.

The rate test scans the synthetic BadNets training set, whose defender's clean images are drawn
from that same training set: scanned clean samples and references are then exchangeable, the
case the stated rate is promised in. Measured over fixture seeds 0-3 (one thread), with the
unlearned margin and Spectral Signatures: 3.9-5.6% of the 900 clean samples flagged at a stated
5%, 16.1-24.0% at 20%; AUROC 0.78-1.00.
"""

from __future__ import annotations

import math

import pytest
import torch

from rnp.detection import sample_scan
from rnp.detection.sample_scan import (SampleScanConfig, combine_p_values, conformal_p_values,
                                       scan_samples)
from rnp.errors import RnpError
from rnp.metrics.detection import auroc, positives_mask

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(detectors=("unlearned", "ss"))


def test_conformal_p_values_hand_computed():
    references = torch.tensor([1.0, 2.0, 3.0, 4.0])
    scanned, own = conformal_p_values(torch.tensor([0.0, 2.5, 4.0, 5.0]), references)
    assert scanned.tolist() == pytest.approx([5 / 5, 3 / 5, 2 / 5, 1 / 5])
    assert own.tolist() == pytest.approx([4 / 4, 3 / 4, 2 / 4, 1 / 4])  # each left out of its own count
    tied, tied_own = conformal_p_values(torch.tensor([2.0]), torch.tensor([2.0, 2.0]))
    assert tied.tolist() == [1.0] and tied_own.tolist() == [1.0, 1.0]  # ties count as "at least"


def test_combination_is_fishers_in_decades():
    def p(*values):
        return torch.tensor(values, dtype=torch.float64)

    combined = combine_p_values([p(0.01, 1.0, 0.1, 0.5), p(1.0, 0.01, 0.1, 1.0)])
    assert combined.tolist() == pytest.approx([2.0, 2.0, 2.0, -math.log10(0.5)])
    assert combine_p_values([p(0.001)]).tolist() == pytest.approx([3.0])


def test_combination_finds_what_either_detector_finds():
    """Half the positives stand out on one score, half on the other: each alone ranks them
    barely better than chance, the combination nearly perfectly."""
    generator = torch.Generator().manual_seed(0)
    negatives, references = torch.randn(2, 900, generator=generator), torch.randn(2, 500, generator=generator)
    positives = torch.randn(2, 100, generator=generator)
    positives[0, :50] += 6
    positives[1, 50:] += 6
    flags = torch.cat([torch.zeros(900, dtype=torch.bool), torch.ones(100, dtype=torch.bool)])
    scores = torch.cat([negatives, positives], 1)
    p_values = [conformal_p_values(scores[d], references[d])[0] for d in range(2)]
    assert max(auroc(scores[d], flags) for d in range(2)) < 0.8
    assert auroc(combine_p_values(p_values), flags) > 0.97


@pytest.fixture(scope="module")
def scan(synthetic_backdoor):
    return scan_samples(synthetic_backdoor.model, synthetic_backdoor.poisoned.data, synthetic_backdoor.clean,
                        SampleScanConfig(**FAST))


@pytest.mark.parametrize("rate", [0.05, 0.2])
def test_the_flag_realises_the_stated_rate_on_clean_samples_like_the_references(synthetic_backdoor, scan, rate):
    poisoned = synthetic_backdoor.poisoned
    positives = positives_mask(poisoned.poisoned_indices, len(poisoned.data))
    result = scan if rate == 0.05 else scan_samples(synthetic_backdoor.model, poisoned.data, synthetic_backdoor.clean,
                                                    SampleScanConfig(false_positive_rate=rate, **FAST))
    realised = float(result.flagged[~positives].double().mean())
    assert rate / 2.5 < realised < rate * 1.6 + 0.02
    assert result.reference_flag_rate() <= rate
    assert auroc(result.combined, positives) > 0.7  # measured 0.78 at seed 0, 0.97-1.00 at 1-3


def test_scan_reports_every_detector_and_is_repeatable(synthetic_backdoor, scan):
    data = synthetic_backdoor.poisoned.data
    assert set(scan.scores) == set(scan.p_values) == {"unlearned", "ss"}
    assert all(len(v) == len(data) for v in scan.scores.values())
    assert scan.references == len(synthetic_backdoor.clean)
    again = scan_samples(synthetic_backdoor.model, data, synthetic_backdoor.clean, SampleScanConfig(**FAST))
    assert torch.equal(again.combined, scan.combined) and again.threshold == scan.threshold


def test_unlearning_never_sees_the_images_it_scores(synthetic_backdoor, monkeypatch):
    """Cross-fitting: every exposure learns from the other folds, and scores only its own fold's
    references; together the folds score every reference once."""
    clean = synthetic_backdoor.clean
    seen, real_expose = [], sample_scan.expose

    def recording_expose(model, support, config):
        seen.append({tuple(image.flatten().tolist()) for image in support.images})
        return real_expose(model, support, config)

    monkeypatch.setattr(sample_scan, "expose", recording_expose)
    result = scan_samples(synthetic_backdoor.model, synthetic_backdoor.poisoned.data.subset(torch.arange(40)),
                          clean, SampleScanConfig(detectors=("unlearned",), folds=3))
    assert len(seen) == 3
    everyone = [tuple(image.flatten().tolist()) for image in clean.images]
    for support in seen:  # each support leaves out about a third of the clean images
        assert len(clean) // 2 < sum(image in support for image in everyone) < len(clean)
    assert sum(sum(image not in support for image in everyone) for support in seen) == len(clean)
    assert len(result.reference_scores["unlearned"]) == len(clean)


@pytest.mark.parametrize("settings, message", [
    (dict(detectors=("unlearned", "nope")), "detectors take"),
    (dict(detectors=()), "detectors take"),
    (dict(detectors=("ss", "ss")), "repeat"),
    (dict(folds=1), "folds"),
    (dict(folds=True), "folds"),
    (dict(false_positive_rate=0.0), "false_positive_rate"),
    (dict(false_positive_rate=1.5), "false_positive_rate"),
])
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(RnpError, match=message):
        SampleScanConfig(**settings)


def test_too_few_clean_images_is_an_error(synthetic_backdoor):
    with pytest.raises(RnpError, match="at least 4 clean images"):
        scan_samples(synthetic_backdoor.model, synthetic_backdoor.poisoned.data,
                     synthetic_backdoor.clean.subset(torch.arange(3)), SampleScanConfig(**FAST))


@pytest.mark.parametrize("name", ["ss", "ac"])
def test_references_are_scored_as_one_more_sample_of_the_data(synthetic_backdoor, name):
    """A reference that is a scanned sample scores what that sample scores, and the scanned
    scores are the detector's own."""
    from rnp.detection.poisoned_samples import ActivationClustering, ActivationClusteringConfig, SpectralSignatures
    detector = SpectralSignatures() if name == "ss" else ActivationClustering(ActivationClusteringConfig(components=3))
    model, data, clean = synthetic_backdoor.model, synthetic_backdoor.poisoned.data, synthetic_backdoor.clean
    picked = torch.tensor([0, 5, 17, 230, 999])
    scores, references = detector.score_with_reference(model, data, clean, data.subset(picked))
    assert torch.equal(scores, detector.score(model, data, clean))
    assert references.tolist() == pytest.approx(scores[picked].tolist(), rel=1e-5, abs=1e-6)
    assert len(set(references.tolist())) > 1
