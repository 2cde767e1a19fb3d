"""The training loop, training with resume after interruption, and prediction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import separable_image_set, tiny_cnn
from rnp.errors import RnpError
from rnp.training import TrainConfig, predict, run_epoch, train


class Interrupted(Exception):
    pass


def dataset_loss(model: nn.Module, data) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(data.images.float() / 255), data.labels))


def small_config(**changes) -> TrainConfig:
    params = dict(epochs=2, batch_size=8, lr=0.05, augment=True, seed=3)
    return TrainConfig(**{**params, **changes})


# --- train -----------------------------------------------------------------------------------

def test_train_lowers_the_loss():
    data = separable_image_set(n=32)
    model = tiny_cnn(width=8)  # at width 4 one fixture seed of five starts with every ReLU dead
    before = dataset_loss(model, data)
    history = train(model, data, small_config(epochs=3, lr=0.1, augment=False, schedule="constant"),
                    progress=False)
    assert len(history) == 3 and all(h.steps == 4 and not h.stopped for h in history)
    assert dataset_loss(model, data) < 0.8 * before
    assert history[-1].loss < history[0].loss


def test_resume_after_interruption_is_bit_identical(tmp_path):
    data = separable_image_set(n=24)
    config = small_config()

    reference = tiny_cnn(batch_norm=True)
    reference_history = train(reference, data, config, progress=False)

    checkpoint = tmp_path / "train.safetensors"
    calls = []

    def interrupt_after_first_epoch(epoch, stats):
        calls.append(epoch)
        if epoch == 0:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(tiny_cnn(batch_norm=True), data, config, checkpoint=checkpoint, progress=False,
              on_epoch=interrupt_after_first_epoch)
    assert checkpoint.exists()

    resumed = tiny_cnn(batch_norm=True, seed=99)  # other start weights: the checkpoint must win
    history = train(resumed, data, config, checkpoint=checkpoint, progress=False,
                    on_epoch=interrupt_after_first_epoch)
    assert calls == [0, 1]  # the second call ran only the missing epoch
    assert history == reference_history
    expected = reference.state_dict()
    actual = resumed.state_dict()
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_resume_with_another_config_raises(tmp_path):
    data = separable_image_set(n=16)
    checkpoint = tmp_path / "train.safetensors"
    train(tiny_cnn(), data, small_config(epochs=1), checkpoint=checkpoint, progress=False)
    for changed in (small_config(epochs=1, lr=0.01), small_config(epochs=1, seed=4),
                    small_config(epochs=1, milestones=(5,))):
        with pytest.raises(RnpError, match="config"):
            train(tiny_cnn(), data, changed, checkpoint=checkpoint, progress=False)


def test_train_config_schedules_and_validation():
    cosine = TrainConfig(epochs=4, lr=0.2)
    assert cosine.lr_at(0) == pytest.approx(0.2) and cosine.lr_at(2) == pytest.approx(0.1)
    steps = TrainConfig(lr=1.0, schedule="multistep", milestones=[2, 4], gamma=0.5)
    assert [steps.lr_at(e) for e in range(6)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert TrainConfig(schedule="constant", lr=0.3).lr_at(50) == 0.3
    for bad in ({"schedule": "linear"}, {"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}):
        with pytest.raises(RnpError):
            TrainConfig(**bad)


# --- run_epoch -------------------------------------------------------------------------------

def test_run_epoch_counts_steps():
    data = separable_image_set(n=30)
    model = tiny_cnn()
    seen = []
    stats = run_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.01), batch_size=8,
                      generator=torch.Generator().manual_seed(0),
                      after_step=lambda info: seen.append(info) or False)
    assert stats.steps == 4 and not stats.stopped
    assert [i.step for i in seen] == [1, 2, 3, 4]
    assert [i.batch_size for i in seen] == [8, 8, 8, 6]
    assert stats.loss == pytest.approx(sum(i.loss * i.batch_size for i in seen) / 30)
    assert 0 <= stats.accuracy <= 1


def test_run_epoch_after_step_true_stops_early():
    data = separable_image_set(n=32)
    model = tiny_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    updates = []
    optimizer.register_step_post_hook(lambda *_: updates.append(1))
    seen = []

    def stop_at_second_step(info):
        seen.append(info.step)
        return info.step == 2

    stats = run_epoch(model, data, optimizer, batch_size=8, generator=torch.Generator().manual_seed(0),
                      after_step=stop_at_second_step)
    assert stats.stopped and stats.steps == 2
    assert seen == [1, 2] and len(updates) == 2


@pytest.mark.parametrize("ascent", [True, False])
def test_run_epoch_ascent_increases_the_loss(ascent):
    data = separable_image_set(n=32)
    model = tiny_cnn(width=8)  # at width 4 one fixture seed of five starts with every ReLU dead
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = dataset_loss(model, data)
    for _ in range(2):
        run_epoch(model, data, optimizer, batch_size=8, augment=False, ascent=ascent,
                  generator=torch.Generator().manual_seed(0))
    after = dataset_loss(model, data)
    assert after > before + 0.2 if ascent else after < before - 0.2


# --- predict ---------------------------------------------------------------------------------

class ModeRecorder(nn.Module):
    """Predicts the brightest channel and records the mode it was called in."""

    def __init__(self):
        super().__init__()
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return x.mean(dim=(2, 3))


@pytest.mark.parametrize("training", [True, False])
def test_predict_runs_in_eval_mode_and_restores_mode(training):
    data = separable_image_set(n=11)
    model = ModeRecorder().train(training)
    predictions = predict(model, data, batch_size=4)
    assert model.training is training
    assert model.modes == [False, False, False]  # 3 batches, all in eval mode
    assert predictions.shape == (11,) and predictions.dtype == torch.long
    assert torch.equal(predictions, (data.images.float().mean(dim=(2, 3))).argmax(1))


def test_predict_logits_and_mode_restored_after_error():
    data = separable_image_set(n=5)
    model = tiny_cnn()
    logits = predict(model, data, return_logits=True)
    assert logits.shape == (5, 2)
    assert torch.equal(logits.argmax(1), predict(model, data))

    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    broken = Broken().train()
    with pytest.raises(ValueError):
        predict(broken, data)
    assert broken.training
