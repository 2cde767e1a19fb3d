"""What RNP's unlearned model exposes: the backdoor's target label and whether there is one.

RNP's first stage (:meth:`rnp.defenses.rnp.RNP.unlearn`) raises the loss on the defender's
clean images until their accuracy collapses. The clean function breaks first; a backdoor,
which the clean images never exercise, survives. Where the clean predictions go as they break
is telling: a backdoored model's predictions collapse onto the target class, which the
backdoor has made an easy, input-independent answer; a clean model's spread over several
classes. Li et al. (RNP, ICML 2023) state that the unlearned model serves backdoor label
detection; the first author's follow-up code (Expose Before You Defend, EBYD) turns the same
observation into a backdoored-model test. This module makes both first-class:

- :func:`detect_target_label` names the class the predictions drift to during unlearning, and
  says when none stands out (a clean model, or an all-to-all backdoor);
- :func:`detect_backdoored_model` scores the unlearned model's prediction histogram on the
  clean images by its variance across classes, EBYD's statistic, with EBYD's threshold 0.01;
- :func:`expose_runs` repeats the unlearning on random parts of the clean images with other
  seeds and :func:`run_summaries` says where each run drifted (issue 16's development data:
  how often one class wins, on clean and on backdoored models).

Both read only the defender's clean images and the unlearning run (nothing from test data or
poisoned data), so they can be run by a defender as they are.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from rnp.data.images import ImageSet
from rnp.defenses.base import prepare_inputs
from rnp.defenses.rnp import RNP, RNPConfig, RNPResult, collapse_subsets
from rnp.errors import RnpError
from rnp.metrics.collapse import confusion_matrix
from rnp.metrics.detection import anomaly_indices
from rnp.training.evaluate import predict
from rnp.utils import model_device

EBYD_VARIANCE_THRESHOLD = 0.01
"""Variance of the class shares above which EBYD's ``detections/Unlearning.py`` calls a model
backdoored (``../shared/docs/rnp-spec.md`` section 5)."""

LABEL_ANOMALY_THRESHOLD = 2.0
"""A class is named as the target when its drift share's anomaly index (median absolute
deviation, as Neural Cleanse scores trigger norms) is at least this: Neural Cleanse's cut-off."""

MIN_SPREAD = 1e-3
"""Floor of the robust spread of the shares (a tenth of a percent of the predictions)."""


@dataclass(eq=False)
class Exposure:
    """A model and its RNP-unlearned copy, with how the unlearning went.

    ``prediction_counts`` (steps x classes) counts, for every unlearning step, the images of its
    batch predicted as each class; ``unlearning`` is RNP's stage-1 report; ``seconds`` the time
    the unlearning took.
    """

    original: nn.Module
    unlearned: nn.Module
    clean: ImageSet
    unlearning: dict
    prediction_counts: torch.Tensor
    seconds: float

    @classmethod
    def from_rnp(cls, result: RNPResult, clean: ImageSet) -> "Exposure":
        """The exposure an RNP run already made, so detection costs no second unlearning."""
        return cls(result.artifacts["original_model"], result.unlearned_model, clean,
                   result.report["unlearning"], result.artifacts["unlearning_predictions"],
                   result.timings.get("unlearn", 0.0))

    def drift_shares(self) -> torch.Tensor:
        """Each class's share of the predictions over the unlearning run, step ``t`` of ``T``
        weighted by ``t``: the later, more collapsed steps count most, the early ones (where
        the model is still mostly right) least."""
        counts = self.prediction_counts.double()
        weights = torch.arange(1, len(counts) + 1, dtype=torch.float64)[:, None]
        weighted = (counts * weights).sum(0)
        return (weighted / weighted.sum()).float()

    def final_shares(self) -> torch.Tensor:
        """Each class's share of the unlearned model's predictions on the clean images."""
        predictions = predict(self.unlearned, self.clean, device=model_device(self.unlearned))
        counts = torch.bincount(predictions, minlength=self.prediction_counts.shape[1])
        return counts.float() / len(predictions)


def expose(model: nn.Module, clean_data, config: RNPConfig | None = None, *,
           progress: bool = False, **overrides) -> Exposure:
    """Runs RNP's unlearning stage on a copy of ``model`` with the defender's clean images.

    ``config`` (or keyword overrides) is RNP's; only its unlearning fields matter here.
    """
    original, clean, device = prepare_inputs(model, clean_data)
    defense = RNP(config, progress=progress, **overrides)
    start = time.perf_counter()
    unlearned, summary, counts = defense.unlearn(original, clean, device)
    return Exposure(original, unlearned.eval(), clean, summary, counts, time.perf_counter() - start)


def expose_runs(model: nn.Module, clean_data, runs: int, subset: float, config: RNPConfig | None = None,
                *, seed: int = 0, progress: bool = False, **overrides) -> list[Exposure]:
    """``runs`` unlearnings of copies of ``model``, run ``r`` on a random ``subset`` share of the
    clean images (drawn with its own seeded generator) with RNP's seed ``seed + r`` (which
    replaces the seed of ``config``).

    One unlearning names the class its predictions drift to; whether another draw of the images
    and another batch order name the same class tells a target the model carries from a class
    the collapse of one clean set happens to favour. Each exposure's ``clean`` is its own part.
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise RnpError(f"runs takes integers >= 1, got {runs!r}")
    if not 0 < subset <= 1:
        raise RnpError(f"subset is a share of the clean images in (0, 1], got {subset!r}")
    _, clean, _ = prepare_inputs(model, clean_data)
    exposures = []
    for run, pick in enumerate(collapse_subsets(len(clean), runs, subset, seed)):
        if config is None:
            run_config, run_overrides = None, {**overrides, "seed": seed + run}
        else:
            run_config, run_overrides = dataclasses.replace(config, seed=seed + run), overrides
        exposures.append(expose(model, clean.subset(pick), run_config, progress=progress,
                                **run_overrides))
    return exposures


def run_summaries(exposures: list[Exposure], clean: ImageSet) -> list[dict]:
    """Per unlearning: the class its predictions drifted to (``candidate``), every class's drift
    share, the steps it took, and the unlearned model's predictions on all of ``clean`` as
    shares per class and as a confusion matrix (rows: the images' labels, counts), which shows
    whether the collapse is one class for every label (all-to-one) or a map between classes."""
    summaries = []
    for exposure in exposures:
        shares = exposure.drift_shares()
        predictions = predict(exposure.unlearned, clean, device=model_device(exposure.unlearned))
        confusion = confusion_matrix(clean.labels, predictions, exposure.prediction_counts.shape[1])
        summaries.append({"candidate": int(shares.argmax()), "drift_shares": [round(float(v), 6) for v in shares],
                          "steps": exposure.unlearning["steps"], "seconds": exposure.seconds,
                          "final_shares": [round(float(v), 6) for v in confusion.sum(0).double() / len(clean)],
                          "confusion": confusion.tolist()})
    return summaries


@dataclass(frozen=True)
class LabelDetection:
    """The backdoor target named from an exposure.

    ``candidate`` is the class with the largest drift share; ``target`` is that class when its
    anomaly index reaches the threshold, else None (no single class stands out). ``confidence``
    is the candidate's anomaly index, ``shares`` the drift share of every class.
    """

    target: int | None
    candidate: int
    confidence: float
    threshold: float
    shares: list[float]

    def to_dict(self) -> dict:
        return {"target": self.target, "candidate": self.candidate, "confidence": self.confidence,
                "threshold": self.threshold, "shares": self.shares}


def detect_target_label(exposure: Exposure, threshold: float = LABEL_ANOMALY_THRESHOLD) -> LabelDetection:
    """Names the class the clean predictions drift to during unlearning.

    The drift share of each class (:meth:`Exposure.drift_shares`) is scored by how far it lies
    above the median share, in robust standard deviations (MAD x 1.4826, at least
    :data:`MIN_SPREAD`, so the index stays finite when most shares are equal); the top class is the
    target when that anomaly index is at least ``threshold``. An all-to-all backdoor has no
    single target and a clean model none at all; in both the top class rarely stands out.
    """
    shares = exposure.drift_shares().double()
    candidate = int(shares.argmax())
    confidence = float(anomaly_indices(shares, MIN_SPREAD)[candidate])
    return LabelDetection(candidate if confidence >= threshold else None, candidate, confidence,
                          threshold, [round(float(s), 6) for s in shares])


@dataclass(frozen=True)
class ModelDetection:
    """Whether a model looks backdoored: ``score`` is the variance of the unlearned model's class
    shares on the clean images, ``backdoored`` whether it exceeds ``threshold``."""

    score: float
    threshold: float
    backdoored: bool
    shares: list[float]

    def to_dict(self) -> dict:
        return {"score": self.score, "threshold": self.threshold, "backdoored": self.backdoored,
                "shares": self.shares}


def detect_backdoored_model(exposure: Exposure,
                            threshold: float = EBYD_VARIANCE_THRESHOLD) -> ModelDetection:
    """EBYD's test: the variance across classes of the unlearned model's prediction shares.

    A model whose predictions all collapse onto one of K classes scores ``(K - 1) / K**2``
    (0.09 for ten classes); evenly spread predictions score 0. The threshold 0.01 is EBYD's and
    is not fitted to any test data; :func:`rnp.metrics.threshold_at_fpr` sets one from scores of
    models the defender knows to be clean.
    """
    shares = exposure.final_shares()
    score = float(shares.var(unbiased=False))
    return ModelDetection(score, threshold, score > threshold, [round(float(s), 6) for s in shares])
