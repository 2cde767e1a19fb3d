"""Poisoned-sample scorers (loss, Spectral Signatures, Activation Clustering, STRIP) and the
detection metrics (AUROC, TPR at a fixed FPR).

The scorers run on the training set the synthetic BadNets model was trained on (1,000 smooth
images, 100 poisoned, target 0). There the poisoned images are 100 of the 192 images labelled
0, a majority, which is the regime SS's centring and AC's "smaller cluster" assumptions are
weakest in; measured AUROCs (seeded, one thread): loss 0.77, SS 0.65, AC (3 components) 0.79,
STRIP 0.61 with the release's unclipped sum and 0.92 with a 0.5/0.5 blend (the tiny model is
not robust to the [0, 2] pixels of the sum). Each threshold sits below its measurement and
well above what the method gives with its key step removed.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from helpers import smooth_images, tiny_cnn
from rnp.data.images import ImageSet
from rnp.detection.poisoned_samples import (SAMPLE_DETECTORS, ActivationClustering,
                                            ActivationClusteringConfig, LossScore, LossScoreConfig,
                                            SpectralSignatures, SpectralSignaturesConfig, Strip,
                                            StripConfig, UnlearnedMargin, kmeans,
                                            last_linear_features)
from rnp.errors import RnpError
from rnp.metrics.detection import auroc, positives_mask, threshold_at_fpr, tpr_at_fpr

pytestmark = pytest.mark.usefixtures("one_thread")

STRIP_FAST = dict(overlays=20)
AC_TINY = dict(components=3)  # the tiny model's 64-dim features: 10 whitened axes drown the split


@pytest.fixture(scope="module")
def poisoned(synthetic_backdoor):
    return synthetic_backdoor.poisoned


@pytest.fixture(scope="module")
def positives(poisoned):
    return positives_mask(poisoned.poisoned_indices, len(poisoned.data))


# ------------------------------------------------------------------------------- metrics


def test_auroc_hand_computed_cases():
    flags = torch.tensor([False, False, True, True])
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), flags) == pytest.approx(0.75)
    assert auroc(torch.tensor([0.0, 1.0, 2.0, 3.0]), flags) == 1.0  # perfect
    assert auroc(torch.tensor([3.0, 2.0, 1.0, 0.0]), flags) == 0.0  # reversed
    assert auroc(torch.ones(4), flags) == 0.5  # all tied
    # positives 2 and 3 against negatives 1 and 2: pairs 1 + 0.5 (tie) + 1 + 1 = 3.5 of 4
    assert auroc(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([False, True, False, True])) \
        == pytest.approx(0.875)


def test_auroc_equals_pairwise_count_with_many_ties():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (300,), generator=generator).float()
    flags = torch.rand(300, generator=generator) < 0.3
    pos, neg = scores[flags], scores[~flags]
    pairs = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    assert auroc(scores, flags) == pytest.approx(float(pairs) / (len(pos) * len(neg)))


def test_threshold_and_tpr_follow_the_documented_convention():
    negatives = torch.arange(20.0)  # 0 .. 19
    # 5% of 20 negatives = 1 may lie strictly above: the threshold is the second highest, 18
    assert threshold_at_fpr(negatives, 0.05) == 18.0
    assert threshold_at_fpr(negatives, 0.0) == 19.0
    assert threshold_at_fpr(negatives, 1.0) == -math.inf
    assert threshold_at_fpr(torch.arange(100.0), 0.29) == 70.0  # 0.29 * 100 is 28.999... in floats
    # ties: [5, 5, 5, 1] at 25% -> 5 (nothing above it); anything lower has 3 of 4 above
    assert threshold_at_fpr(torch.tensor([5.0, 5.0, 5.0, 1.0]), 0.25) == 5.0
    scores = torch.cat([negatives, torch.tensor([18.0, 18.5, 19.0, 25.0])])
    flags = torch.arange(24) >= 20
    assert tpr_at_fpr(scores, flags, 0.05) == 0.75  # the positive tied at 18 is not flagged
    assert tpr_at_fpr(scores, flags, 0.0) == 0.25
    assert tpr_at_fpr(scores, flags, 1.0) == 1.0
    assert tpr_at_fpr(scores, flags) == 0.75  # default fpr is 5%


@pytest.mark.parametrize("scores, flags", [
    ([0.1, 0.2, 0.3], [True, False]),  # lengths differ
    ([0.1, 0.2], [False, False]),  # no positive
    ([0.1, 0.2], [True, True]),  # no negative
    ([0.1, 0.2], [1, 0]),  # not a boolean mask
    ([0.1, float("nan")], [True, False]),
])
def test_metrics_refuse_bad_input(scores, flags):
    for metric in (auroc, tpr_at_fpr):
        with pytest.raises(RnpError):
            metric(torch.tensor(scores), torch.tensor(flags))


@pytest.mark.parametrize("fpr", [-0.1, 1.5, True, "0.05"])
def test_tpr_refuses_bad_fpr(fpr):
    with pytest.raises(RnpError):
        tpr_at_fpr(torch.tensor([0.0, 1.0]), torch.tensor([False, True]), fpr)


def test_positives_mask():
    assert positives_mask(torch.tensor([0, 3]), 5).tolist() == [True, False, False, True, False]
    with pytest.raises(RnpError):
        positives_mask([5], 5)


# ----------------------------------------------------------------- detectors on the backdoor

# Spectral Signatures ranked the poisoned samples at AUROC 0.56 on one fixture seed: here half of
# label 0 is poisoned, where its top singular direction need not single them out; the next test
# asserts the paper's setting, poison a minority of its label. STRIP with the release's blend
# (both images at full weight, then clipped) ranked the poisoned
# samples anywhere from AUROC 0.06 to 1.00 over fixture seeds 0-4 on these smooth images, so
# only the half-and-half blend (0.85-0.99) is asserted here; CIFAR-10 numbers are in the
# exposure benchmark.
@pytest.mark.parametrize("detector, minimum", [
    (LossScore(), 0.6),
    (ActivationClustering(ActivationClusteringConfig(**AC_TINY)), 0.72),
    (Strip(StripConfig(**STRIP_FAST, image_weight=0.5, overlay_weight=0.5)), 0.75),
], ids=["loss", "ac", "strip-half-blend"])
def test_detectors_rank_poisoned_training_samples_high(detector, minimum, synthetic_backdoor,
                                                       poisoned, positives):
    scores = detector.score(synthetic_backdoor.model, poisoned.data, synthetic_backdoor.clean)
    assert scores.shape == (len(poisoned.data),) and scores.dtype == torch.float32
    assert auroc(scores, positives) > minimum


def test_spectral_signatures_are_strong_when_poison_is_a_minority_of_its_label(
        synthetic_backdoor, poisoned, positives):
    """With 25 poisoned among 117 images labelled 0, the setting of the paper's analysis."""
    keep = torch.cat([(~positives).nonzero().squeeze(1), poisoned.poisoned_indices[:25]]).sort().values
    scores = SpectralSignatures().score(synthetic_backdoor.model, poisoned.data.subset(keep), None)
    assert auroc(scores, positives[keep]) > 0.8  # measured 0.84


def test_scores_follow_the_order_of_the_data(synthetic_backdoor, poisoned):
    order = torch.randperm(len(poisoned.data), generator=torch.Generator().manual_seed(1))[:300]
    subset = poisoned.data.subset(order)
    for detector in (LossScore(), SpectralSignatures()):
        whole = detector.score(synthetic_backdoor.model, subset, None)
        reversed_set = subset.subset(torch.arange(299, -1, -1))
        flipped = detector.score(synthetic_backdoor.model, reversed_set, None)
        assert torch.allclose(flipped, whole.flip(0), atol=1e-5)


def test_seeded_detectors_repeat_exactly_and_depend_on_the_seed(synthetic_backdoor, poisoned):
    model, clean = synthetic_backdoor.model, synthetic_backdoor.clean
    data = poisoned.data.subset(range(200))
    first = Strip(StripConfig(overlays=8, seed=3)).score(model, data, clean)
    assert torch.equal(first, Strip(StripConfig(overlays=8, seed=3)).score(model, data, clean))
    assert not torch.equal(first, Strip(StripConfig(overlays=8, seed=4)).score(model, data, clean))
    ac = ActivationClustering(ActivationClusteringConfig(**AC_TINY, seed=5))
    assert torch.equal(ac.score(model, poisoned.data, clean), ac.score(model, poisoned.data, clean))


def test_strip_batches_do_not_change_the_scores(synthetic_backdoor, poisoned):
    model, clean = synthetic_backdoor.model, synthetic_backdoor.clean
    data = poisoned.data.subset(range(50))
    big = Strip(StripConfig(overlays=8, batch_size=1024)).score(model, data, clean)
    small = Strip(StripConfig(overlays=8, batch_size=5)).score(model, data, clean)  # chunks of 1
    assert torch.allclose(big, small, atol=1e-5)


def test_detectors_leave_the_model_untouched(synthetic_backdoor, poisoned):
    model = copy.deepcopy(synthetic_backdoor.model).train()  # train mode: BN would update
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = poisoned.data.subset(range(100))
    for name, detector in SAMPLE_DETECTORS.items():
        config = {"strip": StripConfig(overlays=4), "ac": ActivationClusteringConfig(**AC_TINY)}
        detector(config.get(name)).score(model, data, synthetic_backdoor.clean)
        assert model.training, name
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), name
        assert not any(m._forward_hooks for m in model.modules()), name  # hooks removed
    assert not synthetic_backdoor.model.training


# ------------------------------------------------------------------ exact, constructed cases


class MeanPixelModel(nn.Module):
    """Two logits: 4 x (mean pixel value) and 0, so every softmax is known in closed form."""

    def forward(self, x):
        mean = x.mean(dim=(1, 2, 3))
        return torch.stack([4 * mean, torch.zeros_like(mean)], dim=1)


def _uniform_set(values, label=0):
    images = torch.tensor(values, dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 2, 2).clone()
    return ImageSet(images, torch.full((len(values),), label), ("a", "b"))


def _entropy_bits(logits):
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
    return float(-(p * p.log2()).sum())


def test_strip_blends_and_measures_entropy_as_documented():
    data = _uniform_set([0, 51, 255])
    clean = _uniform_set([102])  # every overlay is this one image
    scores = Strip(StripConfig(overlays=3)).score(MeanPixelModel(), data, clean)
    # release blend: x + overlay, unclipped; 0.4 is the overlay's pixel value
    expected = [-_entropy_bits([4 * (v / 255 + 0.4), 0.0]) for v in (0, 51, 255)]
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
    half = Strip(StripConfig(overlays=3, image_weight=0.5, overlay_weight=0.5))
    expected = [-_entropy_bits([4 * (0.5 * v / 255 + 0.2), 0.0]) for v in (0, 51, 255)]
    assert half.score(MeanPixelModel(), data, clean).tolist() == pytest.approx(expected, abs=1e-5)


def test_loss_score_is_minus_the_cross_entropy():
    data = _uniform_set([0, 255])
    scores = LossScore().score(MeanPixelModel(), data, None)
    expected = [-math.log(2), math.log(torch.softmax(torch.tensor([4.0, 0.0]), 0)[0].item())]
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)


class LinearOnPixels(nn.Module):
    """Its last nn.Linear reads the flattened pixels, so the representation is the image."""

    def __init__(self, features: int):
        super().__init__()
        self.flatten = nn.Flatten()
        self.head = nn.Linear(features, 2)

    def forward(self, x):
        return self.head(self.flatten(x))


def _two_group_label(majority: int = 30, minority: int = 10):
    """Label 0: ``majority`` 'poisoned' images with a bright first pixel and ``minority`` dark
    ones; label 1: 20 dark images. Small noise on three more pixels. Returns data, flags, clean."""
    generator = torch.Generator().manual_seed(0)
    n = majority + minority + 20
    pixels = torch.zeros(n, 4, dtype=torch.uint8)
    pixels[:, 1:] = torch.randint(0, 30, (n, 3), generator=generator).to(torch.uint8)
    pixels[:majority, 0] = 250
    images = pixels.view(n, 1, 2, 2)
    labels = (torch.arange(n) >= majority + minority).long()
    flags = torch.arange(n) < majority
    clean = ImageSet(images[majority:].clone(), labels[majority:].clone(), ("a", "b"))
    return ImageSet(images, labels, ("a", "b")), flags, clean


def test_activation_clustering_orients_by_the_clean_images_when_poison_is_the_majority():
    data, flags, clean = _two_group_label(majority=30, minority=10)
    model = LinearOnPixels(4)
    result = ActivationClustering().analyze(model, data, clean)
    label0 = result.scores[:40]  # label 1 splits arbitrarily; its scores are not under test
    assert bool((label0[:30] > 0).all()) and bool((label0[30:] < 0).all())
    assert result.smaller_fraction[0] == pytest.approx(0.25)
    assert result.flagged.tolist() == [True, False]  # the paper's size criterion: 25% < 35%
    by_size = ActivationClustering(ActivationClusteringConfig(orientation="size"))
    assert auroc(by_size.score(model, data, clean)[:40], flags[:40]) == 0.0  # inverted


def test_activation_clustering_by_size_finds_a_minority_poison():
    data, flags, _ = _two_group_label(majority=8, minority=32)
    by_size = ActivationClustering(ActivationClusteringConfig(orientation="size"))
    scores = by_size.score(LinearOnPixels(4), data, None)
    assert bool((scores[:8] > 0).all()) and bool((scores[8:40] < 0).all())


def test_spectral_signature_is_the_squared_projection_and_zero_for_lone_samples():
    images = torch.zeros(5, 1, 1, 2, dtype=torch.uint8)
    images[:4, 0, 0, 0] = torch.tensor([0, 0, 0, 200], dtype=torch.uint8)  # label 0: one outlier
    images[4, 0, 0, 1] = 90  # label 1 has one sample
    data = ImageSet(images, torch.tensor([0, 0, 0, 0, 1]), ("a", "b"))
    scores = SpectralSignatures().score(LinearOnPixels(2), data, None)
    x = torch.tensor([0.0, 0.0, 0.0, 200 / 255])
    assert scores.tolist() == pytest.approx(((x - x.mean()) ** 2).tolist() + [0.0], abs=1e-6)


def test_last_linear_features_are_the_input_of_the_head():
    model = tiny_cnn(num_classes=3, width=4)
    data = smooth_images(12, num_classes=3, size=8)
    features = last_linear_features(model, data, batch_size=5)
    with torch.no_grad():
        expected = model[:-1](data.images.float() / 255)
    assert torch.allclose(features, expected, atol=1e-6)


def test_kmeans_separates_two_blobs_and_repeats():
    generator = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(30, 3, generator=generator),
                        torch.randn(10, 3, generator=generator) + 8])
    first, centroids = kmeans(points, 2, 3, 100, torch.Generator().manual_seed(1))
    again, _ = kmeans(points, 2, 3, 100, torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    assert len(set(first[:30].tolist())) == 1 and len(set(first[30:].tolist())) == 1
    assert first[0] != first[-1]
    assert torch.allclose(centroids[first[-1]], points[30:].mean(0))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make", [
    lambda: LossScoreConfig(batch_size=0),
    lambda: SpectralSignaturesConfig(batch_size=-1),
    lambda: ActivationClusteringConfig(components=0),
    lambda: ActivationClusteringConfig(clusters=3),
    lambda: ActivationClusteringConfig(restarts=0),
    lambda: ActivationClusteringConfig(size_threshold=1.5),
    lambda: ActivationClusteringConfig(orientation="median"),
    lambda: StripConfig(overlays=0),
    lambda: StripConfig(image_weight=-1.0),
    lambda: StripConfig(batch_size=2.5),
])
def test_bad_configs_are_refused(make):
    with pytest.raises(RnpError):
        make()


def test_detectors_need_what_they_use():
    data, _, clean = _two_group_label()
    no_linear = nn.Sequential(nn.Flatten())
    for detector in (SpectralSignatures(), ActivationClustering()):
        with pytest.raises(RnpError, match="nn.Linear"):
            detector.score(no_linear, data, clean)
    with pytest.raises(RnpError, match="clean images"):
        Strip().score(LinearOnPixels(4), data, None)
    with pytest.raises(RnpError, match="clean images"):
        ActivationClustering().score(LinearOnPixels(4), data, None)
    other_size = ImageSet(torch.zeros(2, 1, 3, 3, dtype=torch.uint8), torch.zeros(2, dtype=torch.long),
                          ("a", "b"))
    with pytest.raises(RnpError, match="clean images are"):
        Strip().score(LinearOnPixels(4), data, other_size)


def test_registry_names_every_detector():
    assert SAMPLE_DETECTORS == {"ac": ActivationClustering, "ss": SpectralSignatures,
                                "strip": Strip, "loss": LossScore, "unlearned": UnlearnedMargin}
    assert all(cls.name == name for name, cls in SAMPLE_DETECTORS.items())
