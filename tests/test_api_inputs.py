"""The Python API's input contract: non-finite numbers refused, plausible inputs taken or refused
in one line, every config validated, degenerate outcomes warned about, and 1-channel data.

Everything runs on tiny models (width 2 to 4) and 8x8 or 16x16 synthetic images, in seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import typing

import pytest
import torch
from PIL import Image
from torch import nn

from helpers import fixture_seed, separable_image_set, tiny_image_set, write_dataset
from rnp import RNP
from rnp.cli.main import main
from rnp.data import as_image_set
from rnp.data.poisoned import TriggeredSet
from rnp.defenses import CLP, DEFENSES, FT, RemovalDefense
from rnp.defenses.base import DefenseResult
from rnp.errors import RnpError
from rnp.metrics import evaluate_backdoor
from rnp.models import build_model, model_spec
from rnp.models.normalize import CIFAR10_MEAN, CIFAR10_STD
from rnp.training import predict

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_RNP = dict(batch_size=16, unlearn_epochs=1, recover_epochs=1)


def tiny_model(num_classes: int = 3, channels: int = 3) -> nn.Module:
    torch.manual_seed(fixture_seed(0))
    return build_model("preact_resnet18", num_classes=num_classes, width=2, in_channels=channels)


@pytest.fixture(scope="module")
def clean():
    return tiny_image_set(n=24, num_classes=3, size=8)


class BrightnessModel(nn.Module):
    """Class 1 if the mean pixel is above 0.5, else class 0: right on ``separable_image_set``."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[-10.0], [10.0]]))
            self.linear.bias.zero_()

    def forward(self, x):
        return self.linear(x.mean((1, 2, 3))[:, None] - 0.5)


# -- 1. non-finite weights, pixels and scores --------------------------------------------------


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_every_defense_refuses_a_model_with_nan_weights_naming_the_layer(name, clean):
    model = tiny_model()
    with torch.no_grad():
        model.layer4[0].conv1.weight[0, 0, 0, 0] = float("nan")
    expected = r"1 non-finite weight \(NaN or infinity, in layer4\.0\.conv1\.weight\)"
    with pytest.raises(RnpError, match=expected):
        DEFENSES[name]().fit(model, clean)


def test_infinite_batchnorm_statistics_count_as_weights(clean):
    model = tiny_model()
    model.layer1[0].bn1.running_var[0] = float("inf")
    with pytest.raises(RnpError, match=r"layer1\.0\.bn1\.running_var"):
        RNP(**TINY_RNP).fit(model, clean)


def test_evaluation_refuses_nan_weights_instead_of_reporting_an_asr(clean):
    model = tiny_model()
    with torch.no_grad():
        model.linear.weight.fill_(float("nan"))
    triggered = TriggeredSet(clean, torch.zeros(len(clean), dtype=torch.long), torch.arange(len(clean)))
    with pytest.raises(RnpError, match="non-finite weights"):
        evaluate_backdoor(model, clean, triggered)


def test_non_finite_scores_of_finite_weights_are_refused_at_evaluation(clean):
    class Overflowing(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1e30))

        def forward(self, x):
            return (x.flatten(1)[:, :3] + 1) * self.scale * self.scale

    with pytest.raises(RnpError, match="non-finite class scores"):
        evaluate_backdoor(Overflowing(), clean)
    with pytest.raises(RnpError, match="non-finite class scores"):
        FT().fit(Overflowing(), clean)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixels_are_refused(value, clean):
    images = torch.rand(12, 3, 8, 8)
    images[3, 1, 2, 2] = value
    with pytest.raises(RnpError, match="1 non-finite pixel"):
        as_image_set((images, torch.arange(12) % 3))
    with pytest.raises(RnpError, match="non-finite pixel"):
        RNP(**TINY_RNP).fit(tiny_model(), (images, torch.arange(12) % 3))


def test_clp_turns_a_failed_svd_into_one_line(clean, monkeypatch):
    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "matrix_norm", fail)
    with pytest.raises(RnpError, match="CLP cannot compute the spectral norms of conv1"):
        CLP().fit(tiny_model(), clean)


def test_clp_refuses_bounds_that_overflow(clean, monkeypatch):
    norm = torch.linalg.matrix_norm
    monkeypatch.setattr(torch.linalg, "matrix_norm", lambda *args, **kwargs: norm(*args, **kwargs) * math.inf)
    with pytest.raises(RnpError, match="bounds of layer1.0.bn1 are not finite"):
        CLP().fit(tiny_model(), clean)


# -- 2. plausible inputs: taken, or refused in one line ----------------------------------------


def test_clean_data_as_a_list_of_tensors_with_labels(clean):
    images = [clean.images[i].float() / 255 for i in range(len(clean))]
    converted = as_image_set((images, clean.labels.tolist()))
    assert torch.equal(converted.images, clean.images)
    assert torch.equal(converted.labels, clean.labels)
    result = CLP().fit(tiny_model(), (images, clean.labels))
    assert result.report["clean_images"] == len(clean)


def test_clean_data_as_a_list_of_pil_images():
    pictures = [Image.new("L", (8, 8), color=30 * i) for i in range(4)]
    converted = as_image_set((pictures, [0, 1, 0, 1]))
    assert converted.image_shape == (1, 8, 8)
    assert converted.images[3].unique().tolist() == [90]


def test_images_of_different_sizes_are_one_line():
    with pytest.raises(RnpError, match="differ in shape"):
        as_image_set(([torch.rand(3, 8, 8), torch.rand(3, 4, 4)], [0, 1]))


@pytest.mark.parametrize("path", ["data/cifar10", "cifar10-jpeg.zip"])
def test_a_path_as_clean_data_is_refused_with_the_way_to_load_it(path, clean):
    with pytest.raises(RnpError, match=r"is a path.*load_dataset.*select_clean_subset"):
        RNP(**TINY_RNP).fit(tiny_model(), path)


def test_a_model_returning_a_tuple_is_refused_before_any_work(clean):
    class WithFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_model()

        def forward(self, x):
            return self.inner(x), x

    with pytest.raises(RnpError, match="returns a tuple, not a tensor of class scores"):
        RNP(**TINY_RNP).fit(WithFeatures(), clean)
    with pytest.raises(RnpError, match="returns a tuple"):
        predict(WithFeatures(), clean)


# -- 2b. every config is validated -------------------------------------------------------------


def _config_fields() -> list:
    """One case per field of every defense's config."""
    return [pytest.param(cls, spec.name, typing.get_type_hints(cls.config_class)[spec.name],
                         id=f"{name}-{spec.name}")
            for name, cls in sorted(DEFENSES.items()) for spec in dataclasses.fields(cls.config_class)]


def _bad_values(field: str, kind) -> list:
    """Values every config must refuse for a field of this name and type."""
    if kind is bool or set(typing.get_args(kind)) == {bool, type(None)}:  # optional: None means auto
        return ["yes", 1]
    if kind is str:
        return [3]
    if typing.get_origin(kind) is tuple:
        return [5, ["x"]]
    bad = [float("nan"), float("inf"), "1e-3"] if kind is float else [2.5, "3", True]
    ends = lambda *names: any(field == n or field.endswith("_" + n) for n in names)  # noqa: E731
    if ends("lr", "gamma"):
        bad += [0, -1]
    if ends("epochs", "batch_size", "iterations", "rounds") and field != "unlearn_epochs":
        bad += [-3] if field == "repair_epochs" else [0, -3]  # RNP's repair may be off (0)
    if ends("fraction"):
        bad += [-0.1, 1.5]
    if ends("momentum"):
        bad += [-0.1, 1.0]
    if ends("weight_decay", "penalty"):
        bad += [-1e-4]
    return bad


@pytest.mark.parametrize("cls, field, kind", _config_fields())
def test_every_config_field_refuses_bad_values(cls, field, kind):
    cls.config_class()  # the defaults are valid
    for value in _bad_values(field, kind):
        with pytest.raises(RnpError, match=field):
            cls(**{field: value})


def test_rnp_refuses_a_negative_recovering_rate_and_a_zero_alpha():
    with pytest.raises(RnpError, match="recover_lr must be positive, got -1"):
        RNP(recover_lr=-1)
    with pytest.raises(RnpError, match="alpha must be positive"):
        RNP(alpha=0)


def test_neural_cleanse_may_skip_unlearning():
    assert DEFENSES["nc"](unlearn_epochs=0).config.unlearn_epochs == 0


# -- 3. degenerate outcomes are warned about, once ---------------------------------------------


def test_a_model_predicting_one_class_is_warned_about(clean, caplog):
    model = tiny_model()
    with torch.no_grad():
        model.linear.bias.copy_(torch.tensor([0.0, 1e4, 0.0]))
    with caplog.at_level(logging.WARNING, logger="rnp"):
        result = CLP().fit(model, clean)
    expected = "predicts class 'class1' for all 24 clean images before the defense"
    assert [w for w in result.report["warnings"] if expected in w]
    assert sum(expected in r.getMessage() for r in caplog.records) == 1


@dataclasses.dataclass
class NoSettings:
    pass


class Collapse(RemovalDefense):
    """A stand-in defense whose purified model always answers class 0."""

    name = "collapse"
    config_class = NoSettings

    def purify(self, model, clean_data):
        purified = copy.deepcopy(model)
        with torch.no_grad():
            purified.linear.weight.zero_()
            purified.linear.bias.copy_(torch.tensor([1.0, 0.0]))
        return DefenseResult(purified, {"method": self.name})


def test_a_defense_collapsing_clean_accuracy_to_chance_is_warned_about(caplog):
    separable = separable_image_set(n=32, num_classes=2, size=8)
    with caplog.at_level(logging.WARNING, logger="rnp"):
        result = Collapse().fit(BrightnessModel(), separable)
    assert result.report["warnings"] == [
        "the defense brought clean-set accuracy down to 50.0% from 100.0%, chance level being "
        "50.0%: the purified model has lost its clean function"]
    assert [r.getMessage() for r in caplog.records] == result.report["warnings"]


def test_a_sound_outcome_has_no_warnings():
    separable = separable_image_set(n=32, num_classes=2, size=8)
    assert FT(epochs=1, lr=1e-6).fit(BrightnessModel(), separable).report["warnings"] == []


def test_rnp_auto_rule_stopping_at_its_cap_is_warned_about(clean):
    result = RNP(**TINY_RNP, tolerance=1.0, max_prune_fraction=0.05).fit(tiny_model(), clean)
    pruning = result.report["pruning"]
    assert pruning["pruned"] == int(0.05 * pruning["total_channels"])
    assert "stopped at its cap" in pruning["warning"]
    assert pruning["warning"] in result.report["warnings"]


def test_stage_warnings_join_the_list_once(clean):
    settings = {**TINY_RNP, "batch_size": 24, "clean_threshold": 0.0}
    result = RNP(**settings, prune_rule="number", prune_number=0).fit(tiny_model(), clean)
    warning = result.report["unlearning"]["warning"]
    assert result.report["warnings"].count(warning) == 1


def test_diverged_unlearning_is_an_error_not_nan_masks(clean):
    with pytest.raises(RnpError, match=r"unlearning diverged \(lower unlearn_lr\)"):
        RNP(**TINY_RNP, unlearn_lr=1e38, clean_threshold=0.0).fit(tiny_model(), clean)


def test_a_diverged_defense_is_an_error(clean):
    class Diverging(Collapse):
        def purify(self, model, clean_data):
            purified = copy.deepcopy(model)
            with torch.no_grad():
                purified.linear.weight.fill_(float("inf"))
            return DefenseResult(purified, {"method": self.name})

    with pytest.raises(RnpError, match=r"collapse diverged: its purified model has \d+ non-finite"):
        Diverging().fit(tiny_model(num_classes=3), clean)


# -- 4. grayscale data -------------------------------------------------------------------------


def test_one_channel_models_normalise_with_one_averaged_value():
    spec = model_spec("preact_resnet18", in_channels=1)
    assert spec["mean"] == [pytest.approx(sum(CIFAR10_MEAN) / 3)]
    assert spec["std"] == [pytest.approx(sum(CIFAR10_STD) / 3)]
    assert model_spec("vgg16_bn")["mean"] == list(CIFAR10_MEAN)  # RGB unchanged
    with pytest.raises(RnpError, match="give mean and std for 2-channel images"):
        model_spec("resnet18", in_channels=2)


def test_rgb_model_refuses_grayscale_images_instead_of_broadcasting():
    gray = tiny_image_set(n=24, num_classes=3, size=8, channels=1)
    with pytest.raises(RnpError, match="takes 3-channel images but got images of shape \\(1, 8, 8\\)"):
        RNP(**TINY_RNP).fit(tiny_model(channels=3), gray)
    assert RNP(**TINY_RNP).fit(tiny_model(channels=1), gray).model.conv1.in_channels == 1


def test_cli_trains_and_defends_on_grayscale_images(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RNP_CACHE_DIR", str(tmp_path / "cache"))
    data = write_dataset(tmp_path / "gray", classes=3, n_train=30, n_test=15, channels=1)
    run, out = tmp_path / "run", tmp_path / "rnp"
    assert main(["train", "--data", str(data), "--model", "preact_resnet18", "--width", "4",
                 "--epochs", "1", "--batch-size", "16", "--attack", "badnets", "--target", "0",
                 "--out", str(run), "--quiet"]) == 0
    assert json.loads((run / "run.json").read_text())["model"]["in_channels"] == 1
    capsys.readouterr()
    assert main(["defend", "--run", str(run), "--out", str(out), "--unlearn-epochs", "1",
                 "--recover-epochs", "1", "--clean-size", "15", "--batch-size", "16",
                 "--clean-threshold", "0", "--quiet"]) == 0
    printed = [line[len("warning: "):] for line in capsys.readouterr().err.splitlines()
               if line.startswith("warning: ")]
    report = json.loads((out / "report.json").read_text())
    assert printed == report["warnings"]
    assert "never fell to 0.0" in " ".join(printed)  # each warning printed once, from the library
