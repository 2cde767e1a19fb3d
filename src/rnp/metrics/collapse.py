"""The collapse map: where repeated unlearnings send each label, and the verdict it gives.

One unlearning (RNP's stage 1) breaks the clean function on the defender's images. On a
backdoored model the broken predictions go where the backdoor points, and they go there on every
run: to the target for an all-to-one backdoor, to each label's own destination for an all-to-all
one. On a clean model where they go depends on the images and the batch order, so runs on other
parts of the clean set disagree. This module reads the runs' confusion matrices (rows: the clean
images' labels, columns: the unlearned model's predictions); :func:`rnp.detection.collapse.detect_backdoor`
makes the runs for ``rnp inspect``, and RNP makes the same runs to find the class its target
ranking prunes for (``RNPConfig.target_source``).

The statistic is the *map agreement*. Each run moves each label's images mostly to one other
class, the row's mode off the diagonal; the consensus class of a label is the mode most runs
agree on, and the map agreement is the share of all clean images, over all runs, that the
unlearned models predict as their label's consensus class. It is high when every run collapses
the same way, whatever that way is, so one number covers all-to-one and all-to-all backdoors.
Images still predicted as their own label never count: an unlearning that did not break the
model (a shallow exposure) scores low, it does not look like a map. It reads only the
defender's clean images and the unlearning runs.

Development data (``benchmarks/grids/label-runs-w32.yaml``: PreAct-ResNet18 width 32, 6 runs on
half of 500 clean images, three clean sets each): the clean twin of seed 0 scored 0.22, 0.26
and 0.31, BadNets 0.69-0.74 and Blend 0.77-0.89. :data:`MAP_AGREEMENT_THRESHOLD` sits between
the two groups and was fixed before any held-back model was scored. A user with models known to
be clean sets the threshold from their scores instead (:func:`calibrate`), at a stated
false-positive rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rnp.errors import RnpError
from rnp.metrics.detection import false_alarm_bound, threshold_at_fpr

RUNS = 6
"""Unlearnings per verdict, the development setting."""

SUBSET = 0.5
"""Share of the clean images each unlearning draws, the development setting."""

MAP_AGREEMENT_THRESHOLD = 0.5
"""Map agreement above which a model is called backdoored: between the clean twin's highest
development score (0.31) and the backdoored models' lowest (0.69)."""

ALL_TO_ONE_SHARE = 0.5
"""A backdoored model is all-to-one when at least this share of the labels have the same
consensus class (the target); otherwise the consensus is a map between classes: all-to-all."""


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, classes: int) -> torch.Tensor:
    """Counts of each (label, prediction) pair: ``classes x classes``, rows the labels."""
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    confusion.index_put_((labels.long(), predictions.long()), torch.ones_like(predictions).long(), accumulate=True)
    return confusion


@dataclass(frozen=True)
class CollapseMap:
    """Where repeated unlearnings send each label: ``consensus[y]`` is the class other than
    ``y`` that most runs send label ``y``'s images to (None for a label without clean images),
    ``agreement`` the share of all clean images over all runs predicted as their label's
    consensus class, ``run_modes[r][y]`` run ``r``'s own mode off the diagonal for label ``y``."""

    consensus: tuple[int | None, ...]
    agreement: float
    run_modes: tuple[tuple[int | None, ...], ...]


def collapse_map(confusions) -> CollapseMap:
    """The :class:`CollapseMap` of per-run confusion matrices (runs x labels x predictions,
    counts), e.g. the ``confusion`` of every :func:`rnp.detection.exposure.run_summaries` entry.
    Ties go to the lowest class, so the map is deterministic."""
    counts = torch.as_tensor(confusions, dtype=torch.float64)
    if counts.dim() != 3 or counts.shape[1] != counts.shape[2] or len(counts) == 0:
        raise RnpError(f"confusions must be runs x classes x classes, got shape {tuple(counts.shape)}")
    if counts.sum() == 0:
        raise RnpError("confusions hold no predictions")
    present = counts[0].sum(1) > 0
    moved = counts.clone()
    moved[:, range(counts.shape[1]), range(counts.shape[1])] = -1  # a label is never its own destination
    modes = _first_argmax(moved, dim=2)
    consensus, kept = [], 0.0
    for label in range(counts.shape[1]):
        if not present[label]:
            consensus.append(None)
            continue
        votes = torch.bincount(modes[:, label], minlength=counts.shape[2])
        chosen = int(_first_argmax(votes, dim=0))
        consensus.append(chosen)
        kept += float(counts[:, label, chosen].sum())
    run_modes = tuple(tuple(int(m) if present[y] else None for y, m in enumerate(row)) for row in modes)
    return CollapseMap(tuple(consensus), kept / float(counts.sum()), run_modes)


@dataclass(frozen=True)
class BackdoorVerdict:
    """What the collapse map says about the model.

    ``kind`` is ``"clean"`` (the runs disagree: agreement at most ``threshold``),
    ``"all-to-one"`` (they agree, and at least :data:`ALL_TO_ONE_SHARE` of the labels go to one
    class, ``target``) or ``"all-to-all"`` (they agree on a map between classes, ``consensus``).
    ``false_alarm_bound`` is the false-positive rate the threshold implies when it was set from
    known-clean models (:func:`calibrate`), else None: the default threshold comes from
    development models and promises no rate.
    """

    kind: str
    target: int | None
    agreement: float
    threshold: float
    consensus: list[int | None]
    false_alarm_bound: float | None = None

    @property
    def backdoored(self) -> bool:
        return self.kind != "clean"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "backdoored": self.backdoored, "target": self.target,
                "agreement": self.agreement, "threshold": self.threshold, "consensus": self.consensus,
                "false_alarm_bound": self.false_alarm_bound}


@dataclass(frozen=True)
class Calibration:
    """A map-agreement threshold set from ``references`` known-clean models at false-positive
    rate ``fpr`` (at most that share of the references scores above it); ``false_alarm_bound``
    is the chance that one more clean model, exchangeable with the references, scores above it."""

    threshold: float
    fpr: float
    references: int
    false_alarm_bound: float


def calibrate(reference_agreements, fpr: float = 0.05) -> Calibration:
    """The threshold that at most ``fpr`` of the known-clean models' map agreements exceed.

    With ``n`` references the guarantee on a new clean model is ``(floor(fpr * n) + 1) / (n + 1)``,
    not ``fpr``: 19 references are the fewest for a 5% bound at ``fpr`` 0.
    """
    scores = torch.as_tensor(reference_agreements, dtype=torch.float64).flatten()
    threshold = threshold_at_fpr(scores, fpr)
    return Calibration(threshold, fpr, len(scores), false_alarm_bound(len(scores), fpr))


def judge(collapse: CollapseMap, threshold: float | Calibration = MAP_AGREEMENT_THRESHOLD) -> BackdoorVerdict:
    """The verdict on a model from its :class:`CollapseMap`: backdoored when the map agreement
    exceeds ``threshold`` (a number, or a :class:`Calibration` from known-clean models), then
    all-to-one or all-to-all by how many labels share a consensus class."""
    bound = None
    if isinstance(threshold, Calibration):
        threshold, bound = threshold.threshold, threshold.false_alarm_bound
    consensus = list(collapse.consensus)
    if collapse.agreement <= threshold:
        return BackdoorVerdict("clean", None, collapse.agreement, threshold, consensus, bound)
    destinations = [c for c in consensus if c is not None]
    votes = torch.bincount(torch.tensor(destinations), minlength=max(destinations) + 1)
    top = int(_first_argmax(votes, dim=0))
    if votes[top] >= ALL_TO_ONE_SHARE * len(destinations):
        return BackdoorVerdict("all-to-one", top, collapse.agreement, threshold, consensus, bound)
    return BackdoorVerdict("all-to-all", None, collapse.agreement, threshold, consensus, bound)


def _first_argmax(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The index of the first maximum along ``dim`` (``torch.argmax`` does not promise which)."""
    size = values.shape[dim]
    shape = [1] * values.dim()
    shape[dim] = size
    order = torch.arange(size, 0, -1, dtype=torch.float64).reshape(shape)
    best = values == values.max(dim=dim, keepdim=True).values
    return (best * order).argmax(dim=dim)
