"""End to end on synthetic images: implant a BadNets backdoor, then let RNP expose and prune it.

The images are smooth colour layouts (ten classes) with smooth noise, so the 3x3 checkerboard
trigger is the only high-frequency content and the network learns it in channels of its own,
as it does on natural images. On easier synthetic tasks (sharp shapes, fewer classes) the tiny
network spreads the trigger over channels it also needs for the clean task; there, as we
measured, no pruning of a few channels removes the backdoor, so such data cannot test RNP.

Whether the pruning removes the backdoor depends on the machine and the seed: over fixture
seeds 0-4 (``pytest --fixture-seed N``), RNP at batch 32 took ASR to 0.00 on two and left
0.99-1.00 on three, and at its defaults left it on all five; on the machine this test was first
written on it removed it at seed 0. So this test asserts what held on every seed (the unlearning
reaches its clean-accuracy threshold and the unlearned model keeps the backdoor; pruning keeps
clean accuracy), and the
removal is measured where it is meaningful, on CIFAR-10 in the benchmarks.
"""

from __future__ import annotations

import pytest
import torch

from rnp import RNP
from rnp.metrics import evaluate_backdoor


@pytest.fixture
def backdoored(synthetic_backdoor):
    b = synthetic_backdoor
    return b.model, b.clean, b.test, b.triggered


def test_backdoor_is_implanted(backdoored):
    model, _, test_set, triggered = backdoored
    metrics = evaluate_backdoor(model, test_set, triggered)
    assert metrics.clean_accuracy > 0.95
    assert metrics.attack_success_rate > 0.9


def test_rnp_exposes_the_backdoor_and_keeps_accuracy(backdoored):
    model, clean, test_set, triggered = backdoored
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = RNP(batch_size=32).fit(model, clean)
    finally:
        torch.set_num_threads(threads)
    before = evaluate_backdoor(model, test_set, triggered)
    after = evaluate_backdoor(result.model, test_set, triggered)
    unlearned = evaluate_backdoor(result.unlearned_model, test_set, triggered)
    assert result.report["unlearning"]["reached_threshold"]
    assert unlearned.attack_success_rate > 0.9  # the backdoor survives the unlearning (0.95-1.00)
    assert 0 < result.report["pruning"]["pruned"]
    assert after.clean_accuracy > before.clean_accuracy - 0.06  # 0.96-1.00 after, 1.00 before
