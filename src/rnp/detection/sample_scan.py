"""One flag per training sample, from several detectors at once, at a false-positive rate set by
the defender's clean images.

No single detector of :mod:`rnp.detection.poisoned_samples` ranks the poisoned samples of every
attack: on CIFAR-10 PreAct-ResNet18 (width 16, 10 epochs, 5,000 scanned samples) the
unlearned-model margin reaches AUROC 1.00 on BadNets and 0.56 on BadNets all-to-all, Spectral
Signatures 1.00 on all-to-all and 0.54 on BppAttack, STRIP 0.97 on BppAttack and 0.20 on
all-to-all. Their scores do not share a scale either. :func:`scan_samples` puts them on one:

1. Every detector also scores the defender's clean images (the *references*), each exactly as
   one more scanned sample would be scored. Spectral Signatures and Activation Clustering fit
   their statistics on the scanned data and place the references in them
   (``score_with_reference``). The detectors that learn from clean images (the unlearning of
   ``unlearned``, STRIP's overlays) are cross-fitted: the clean images split into seeded
   ``folds``; the model unlearned on (or the overlays drawn from) all folds but ``k`` scores the
   references of fold ``k`` and the scanned samples assigned to ``k`` (a seeded draw), so no
   score comes from a model that saw the image it scores.
2. Each score becomes a conformal p-value: the share of references scoring at least as high,
   ``(1 + #{references >= s}) / (n + 1)``; a reference's own p-value leaves it out of the count.
3. The combined score is Fisher's: ``-sum(log10 p)`` over the detectors. A sample extreme on
   any detector scores high, and one extreme on two scores higher still. (On the development
   subjects, taking the smallest p-value alone ranked slightly worse: AUROC 0.972-0.997
   against Fisher's 0.979-1.000.)
4. The threshold flags at most ``false_positive_rate`` of the references' combined scores. A
   clean scanned sample exchangeable with the references is flagged with that chance.

What the rate assumes: the defender's clean images are scored like the clean training images.
Training itself breaks this for scores that read how well the model fits a sample, the more so
the longer the model trained: the loss (left out of the defaults for that reason) flagged 8.1%
of BadNets' clean training samples at a stated 5%. The realised rate on known-clean scanned
samples is the measure of it.

The detectors and the combination were chosen on development subjects (BadNets, BadNets
all-to-all, BppAttack and Blend at width 16); ``docs/benchmarks/exposure.md`` has the numbers
on held-back ones.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from rnp.data.images import ImageSet
from rnp.defenses import RNPConfig
from rnp.detection.exposure import expose
from rnp.detection.poisoned_samples import SAMPLE_DETECTORS, Strip, StripConfig, UnlearnedMargin
from rnp.errors import RnpError
from rnp.metrics.detection import threshold_at_fpr
from rnp.utils import generator_for

SCAN_DETECTORS = ("unlearned", "strip", "ss", "ac")
"""The detectors combined by default (chosen on the development subjects; the loss detector
ranks well but its rate drifts with how long the model trained, see the module docstring)."""

CROSS_FITTED = ("unlearned", "strip")
"""Detectors that learn from the clean images, scored fold by fold."""


@dataclass
class SampleScanConfig:
    """Settings of :func:`scan_samples`."""

    detectors: tuple[str, ...] = SCAN_DETECTORS  # combined; any of SAMPLE_DETECTORS
    folds: int = 2  # cross-fitting of the unlearning and STRIP's overlays
    false_positive_rate: float = 0.05  # share of the clean references the threshold flags
    strip: StripConfig = field(default_factory=StripConfig)
    seed: int = 0  # folds, the scanned samples' fold draw, and the unlearnings' seeds

    def __post_init__(self):
        self.detectors = tuple(self.detectors)
        unknown = sorted(set(self.detectors) - set(SAMPLE_DETECTORS))
        if unknown or not self.detectors:
            raise RnpError(f"detectors take one or more of {', '.join(SAMPLE_DETECTORS)}, "
                           f"got {', '.join(unknown) or 'none'}")
        if len(set(self.detectors)) != len(self.detectors):
            raise RnpError(f"detectors repeat a name: {', '.join(self.detectors)}")
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            raise RnpError(f"folds takes integers >= 2, got {self.folds!r}")
        if not 0 < self.false_positive_rate < 1:
            raise RnpError(f"false_positive_rate lies in (0, 1), got {self.false_positive_rate!r}")


@dataclass(frozen=True, eq=False)
class SampleScan:
    """What :func:`scan_samples` found. ``scores``/``reference_scores``: each detector's raw
    scores of the scanned samples and of the clean references; ``p_values``: the scanned
    samples' conformal p-values per detector; ``combined``/``combined_reference``: the combined
    scores; ``flagged``: the scanned samples above ``threshold``; ``seconds`` per detector
    (the unlearnings count to ``unlearned``)."""

    scores: dict[str, torch.Tensor]
    reference_scores: dict[str, torch.Tensor]
    p_values: dict[str, torch.Tensor]
    combined: torch.Tensor
    combined_reference: torch.Tensor
    threshold: float
    flagged: torch.Tensor
    false_positive_rate: float
    seconds: dict[str, float]

    @property
    def references(self) -> int:
        return len(self.combined_reference)

    def reference_flag_rate(self) -> float:
        """The share of references above the threshold: at most the rate (less with ties)."""
        return float((self.combined_reference.double() > self.threshold).double().mean())


def scan_samples(model: nn.Module, data: ImageSet, clean: ImageSet, config: SampleScanConfig | None = None,
                 *, unlearning: RNPConfig | None = None, device="cpu") -> SampleScan:
    """Scores every sample of ``data`` with the ``config``'s detectors, combines them against
    the ``clean`` images and flags the samples above the threshold (see the module docstring).
    ``unlearning``: RNP's settings for the unlearned-model detector (default: RNP's, in
    float32); its seed is replaced by ``config.seed + k`` for fold ``k``."""
    config = config or SampleScanConfig()
    if not isinstance(clean, ImageSet) or len(clean) < 2 * config.folds:
        raise RnpError(f"the scan needs at least {2 * config.folds} clean images ({config.folds} folds of 2)")
    if not isinstance(data, ImageSet) or len(data) == 0:
        raise RnpError("nothing to scan: the data holds no sample")
    folds = _folds(len(clean), config.folds, generator_for(config.seed, "scan-folds"))
    assigned = torch.randint(config.folds, (len(data),), generator=generator_for(config.seed, "scan-assignment"))
    scores, references, seconds = {}, {}, {}
    for name in config.detectors:
        start = time.perf_counter()
        if name in CROSS_FITTED:
            scores[name], references[name] = _cross_fitted(name, model, data, clean, folds, assigned, config,
                                                           unlearning, device)
        elif hasattr(SAMPLE_DETECTORS[name], "score_with_reference"):
            scores[name], references[name] = SAMPLE_DETECTORS[name]().score_with_reference(
                model, data, clean, clean, device=device)
        else:
            detector = SAMPLE_DETECTORS[name]()
            scores[name] = detector.score(model, data, clean, device=device)
            references[name] = detector.score(model, clean, clean, device=device)
        seconds[name] = time.perf_counter() - start
    p_values, reference_p = {}, {}
    for name in config.detectors:
        p_values[name], reference_p[name] = conformal_p_values(scores[name], references[name])
    combined = combine_p_values(list(p_values.values()))
    combined_reference = combine_p_values(list(reference_p.values()))
    threshold = threshold_at_fpr(combined_reference, config.false_positive_rate)
    return SampleScan(scores, references, p_values, combined, combined_reference, threshold,
                      combined.double() > threshold, config.false_positive_rate, seconds)


def conformal_p_values(scores: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper-tail conformal p-values of ``scores`` against ``references``,
    ``(1 + #{references >= s}) / (n + 1)``, and of every reference against the others,
    ``(1 + #{other references >= r}) / n``. Compared in float64."""
    ordered = references.double().sort().values
    n = len(ordered)
    at_least = n - torch.searchsorted(ordered, scores.double().contiguous(), right=False)
    others = n - 1 - torch.searchsorted(ordered, references.double().contiguous(), right=False)
    return (1 + at_least).double() / (n + 1), (1 + others).double() / n


def combine_p_values(p_values: list[torch.Tensor]) -> torch.Tensor:
    """Fisher's combination, in decades: ``-sum(log10 p)`` over the detectors. Its threshold is
    set on the references' own combined scores, so the detectors need not be independent."""
    return -torch.stack(p_values).double().log10().sum(0)


def _folds(count: int, folds: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A seeded split of ``range(count)`` in ``folds`` near-equal sorted parts."""
    order = torch.randperm(count, generator=generator)
    return [part.sort().values for part in order.tensor_split(folds)]


def _cross_fitted(name: str, model: nn.Module, data: ImageSet, clean: ImageSet, folds: list[torch.Tensor],
                  assigned: torch.Tensor, config: SampleScanConfig, unlearning: RNPConfig | None,
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of ``data`` and of the clean references, fold by fold: the part of the clean
    images outside fold ``k`` trains the detector that scores fold ``k`` and its samples."""
    scores, references = torch.zeros(len(data)), torch.zeros(len(clean))
    for k, fold in enumerate(folds):
        rest = torch.cat([other for j, other in enumerate(folds) if j != k]).sort().values
        support, members = clean.subset(rest), (assigned == k).nonzero().squeeze(1)
        if name == "unlearned":
            settings = dataclasses.replace(unlearning or RNPConfig(amp="off"), seed=config.seed + k)
            detector, extra = UnlearnedMargin(), {"exposure": expose(model, support, settings)}
        else:
            detector, extra = Strip(config.strip), {}
        scores[members] = detector.score(model, data.subset(members), support, device=device, **extra)
        references[fold] = detector.score(model, clean.subset(fold), support, device=device, **extra)
    return scores, references

