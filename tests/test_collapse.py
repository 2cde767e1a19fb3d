"""The backdoor verdict from where repeated unlearnings send each class (rnp.detection.collapse)."""

from __future__ import annotations

import pytest
import torch

from rnp.detection import calibrate, collapse_map, judge
from rnp.metrics.collapse import MAP_AGREEMENT_THRESHOLD, CollapseMap
from rnp.errors import RnpError
from rnp.metrics import false_alarm_bound

CLASSES = 4


def runs_sending(destinations: list[list[int]], images: int = 10, kept: int = 8) -> torch.Tensor:
    """Confusion matrices of runs where run ``r`` predicts ``kept`` of the ``images`` of label ``y``
    as ``destinations[r][y]`` and the others as the class after it."""
    confusions = torch.zeros(len(destinations), CLASSES, CLASSES)
    for run, row in enumerate(destinations):
        for label, destination in enumerate(row):
            confusions[run, label, destination] += kept
            confusions[run, label, (destination + 1) % CLASSES] += images - kept
    return confusions


def test_runs_that_collapse_onto_one_class_are_all_to_one():
    found = collapse_map(runs_sending([[2, 2, 2, 2]] * 3))
    # the target's own images stay put and never count: its label's destination is where they spill
    assert found.consensus == (2, 2, 3, 2) and found.agreement == pytest.approx((8 + 8 + 2 + 8) / 40)
    verdict = judge(found)
    assert (verdict.kind, verdict.target, verdict.backdoored) == ("all-to-one", 2, True)


def test_runs_that_agree_on_a_map_between_classes_are_all_to_all():
    shift = [[(y + 1) % CLASSES for y in range(CLASSES)]] * 3
    verdict = judge(collapse_map(runs_sending(shift)))
    assert (verdict.kind, verdict.target, verdict.consensus) == ("all-to-all", None, [1, 2, 3, 0])


def test_runs_that_disagree_are_clean():
    found = collapse_map(runs_sending([[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]]))
    assert found.agreement == pytest.approx(0.2 + 0.05)  # one run of four, plus the spill of one other
    assert judge(found).kind == "clean" and judge(found).target is None


def test_an_unlearning_that_left_the_model_right_is_no_map():
    confusions = torch.eye(CLASSES).repeat(3, 1, 1) * 10
    found = collapse_map(confusions)
    assert found.agreement == 0.0 and judge(found).kind == "clean"


def test_the_threshold_decides():
    found = collapse_map(runs_sending([[2, 2, 2, 2]] * 3))
    assert judge(found, threshold=found.agreement).kind == "clean"  # called backdoored strictly above
    assert judge(found, threshold=found.agreement - 1e-6).kind == "all-to-one"
    assert judge(found).threshold == MAP_AGREEMENT_THRESHOLD


def test_a_label_without_images_has_no_consensus():
    confusions = runs_sending([[2, 2, 2, 2]] * 2)
    confusions[:, 3] = 0
    found = collapse_map(confusions)
    assert found.consensus == (2, 2, 3, None) and found.run_modes[0] == (2, 2, 3, None)
    assert found.agreement == pytest.approx((8 + 8 + 2) * 2 / 60) and judge(found).target == 2


def test_ties_go_to_the_lowest_class():
    found = collapse_map(runs_sending([[3, 3, 3, 3], [1, 1, 1, 1]]))
    assert found.consensus == (1, 2, 1, 0)  # labels 0 and 2: one run each for 3 and for 1
    assert judge(CollapseMap((3, 1, 3, 1), 0.9, ())).target == 1


@pytest.mark.parametrize("confusions, message", [(torch.zeros(2, 3, 4), "runs x classes x classes"),
                                                 (torch.zeros(0, 3, 3), "runs x classes x classes"),
                                                 (torch.zeros(2, 3, 3), "no predictions")])
def test_bad_confusions_are_refused(confusions, message):
    with pytest.raises(RnpError, match=message):
        collapse_map(confusions)


def test_calibration_from_clean_references_promises_its_rate():
    references = [0.01 * i for i in range(1, 20)]  # 19 known-clean models
    calibration = calibrate(references, fpr=0.0)
    assert calibration.threshold == pytest.approx(0.19) and calibration.references == 19
    assert calibration.false_alarm_bound == pytest.approx(0.05)
    above = collapse_map(runs_sending([[2, 2, 2, 2]] * 3))
    verdict = judge(above, calibration)
    assert verdict.kind == "all-to-one" and verdict.false_alarm_bound == pytest.approx(0.05)
    assert judge(above, calibrate(references + [0.9], fpr=0.0)).kind == "clean"
    assert judge(above).false_alarm_bound is None


@pytest.mark.parametrize("negatives, fpr, bound", [(19, 0.0, 0.05), (9, 0.0, 0.1), (99, 0.05, 0.05),
                                                   (100, 0.05, 6 / 101), (10, 0.29, 3 / 11), (1, 1.0, 1.0)])
def test_false_alarm_bound(negatives, fpr, bound):
    assert false_alarm_bound(negatives, fpr) == pytest.approx(bound)


@pytest.mark.parametrize("negatives", [0, True, 2.0])
def test_false_alarm_bound_needs_negatives(negatives):
    with pytest.raises(RnpError, match="at least one negative"):
        false_alarm_bound(negatives, 0.05)
