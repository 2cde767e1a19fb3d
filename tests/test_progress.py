"""Long loops' progress: the time estimate logged a few steps in, the bar closing where an early
stop ended the loop, and Neural Cleanse's CPU-sized budget with the paper's one setting away."""

from __future__ import annotations

import contextlib
import logging

import pytest

from rnp.bench.runner import _time_left
from rnp.defenses import RNP, NeuralCleanse, NeuralCleanseConfig
from rnp.defenses import rnp as rnp_module
from rnp.errors import RnpError
from rnp.progress import SAMPLE_STEPS, Progress, format_duration
from rnp.training import TrainConfig, train

from helpers import separable_image_set, tiny_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


def estimates(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "rnp.progress"]


def test_the_estimate_is_logged_once_after_the_sampled_steps(caplog):
    caplog.set_level(logging.INFO, logger="rnp.progress")
    progress = Progress(100, "work", detail="10 epochs x 10 steps")
    for _ in range(SAMPLE_STEPS):  # the first step is warm-up, not timed
        progress.update()
    assert progress.estimate is None and not estimates(caplog)
    for _ in range(10):
        progress.update()
    [record] = estimates(caplog)
    assert record.getMessage().startswith("estimated ")
    assert "(work: 10 epochs x 10 steps at " in record.getMessage()
    assert record.estimate_seconds == progress.estimate >= 0


def test_a_loop_that_may_stop_early_gives_an_upper_bound(caplog):
    caplog.set_level(logging.INFO, logger="rnp.progress")
    progress = Progress(50, "search", unit="batch", bounded=True)
    for _ in range(SAMPLE_STEPS + 1):
        progress.update()
    assert "estimated at most" in estimates(caplog)[0].getMessage()
    assert estimates(caplog)[0].getMessage().endswith("s/batch)")


def test_training_logs_one_estimate_for_all_its_epochs(caplog):
    caplog.set_level(logging.INFO, logger="rnp.progress")
    data = separable_image_set(32)
    train(tiny_cnn(), data, TrainConfig(epochs=3, batch_size=8, augment=False), progress=False)
    [record] = estimates(caplog)
    assert "(training: 3 epochs x 4 steps at " in record.getMessage()


@pytest.mark.parametrize("seconds, text", [(42, "42 s"), (720, "12 min"), (133 * 3600, "133.0 h")])
def test_durations_read_at_a_glance(seconds, text):
    assert format_duration(seconds) == text


def test_the_unlearning_bar_ends_where_the_early_stop_ended_it(monkeypatch):
    bars = []
    original = rnp_module.progress_bar

    @contextlib.contextmanager
    def recording(*args, **kwargs):
        with original(*args, **kwargs) as progress:
            bars.append(progress)
            yield progress

    monkeypatch.setattr(rnp_module, "progress_bar", recording)
    defense = RNP(unlearn_epochs=20, batch_size=8, clean_threshold=1.0, stop_check="epoch",
                  progress=True)
    _, summary, _ = defense.unlearn(tiny_cnn(batch_norm=True), separable_image_set(32), "cpu")
    [progress] = bars
    assert summary["reached_threshold"] and summary["epochs"] == 1
    assert progress.n == progress.total == summary["steps"] == 4  # not 4 of 80
    assert progress.bar.n == progress.bar.total == 4
    assert "at epoch 1, step 4" in progress.bar.desc


def test_skipped_steps_leave_the_total_reachable():
    progress = Progress(30, "reverse", unit="batch", bounded=True)
    progress.update(4)
    progress.skip(16)  # one class stopped early: 16 of its batches never run
    progress.update(10)
    assert progress.n == progress.total == 14


def test_neural_cleanse_runs_the_cpu_budget_unless_told_otherwise():
    assert (NeuralCleanse().config.steps, NeuralCleanse().config.samples_per_step) == (120, 64)
    paper = NeuralCleanse(budget="paper").config
    assert (paper.steps, paper.samples_per_step) == (1000, 1000)
    assert NeuralCleanseConfig().steps == 1000  # the config's defaults stay the paper's
    explicit = NeuralCleanse(steps=7).config
    assert (explicit.steps, explicit.samples_per_step) == (7, 64)
    assert NeuralCleanse(NeuralCleanseConfig(steps=9)).config.steps == 9
    with pytest.raises(RnpError, match="budget"):
        NeuralCleanse(budget="gpu")
    with pytest.raises(RnpError, match="either a config or a budget"):
        NeuralCleanse(NeuralCleanseConfig(), budget="paper")


def test_the_grid_estimates_the_cells_left_at_the_pace_so_far():
    assert _time_left(120.0, 2, 10) == "; estimated 8 min for the 8 cells left (at 60 s/cell so far)"
    assert _time_left(120.0, 10, 10) == ""
