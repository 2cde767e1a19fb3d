"""Mixed precision of the baselines that optimise (rnp.training.precision): amp "on" runs their
optimisation in bfloat16 on the CPU and gives back a float32 model in the usual layout; "off",
and "auto" where it resolves to float32, compute nothing in low precision; records leave the
fields out at float32, so earlier records keep their keys."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rnp.defenses import DEFENSES
from rnp.errors import RnpError
from rnp.utils import config_record, resolve_precision

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = {
    "ft": dict(epochs=2, batch_size=32),
    "fp": dict(epochs=1, batch_size=32, prune_step=2),
    "nad": dict(epochs=1, teacher_epochs=1, batch_size=32),
    "tsbd": dict(epochs=1, batch_size=32, unlearn_lr=0.01, unlearn_epochs=3, augment=False),
    "fp_rnp": dict(epochs=1, batch_size=32, prune_step=2),
    "nft": dict(rounds=1, steps_per_round=4, batch_size=32),
    "anp": dict(iterations=4, batch_size=32, augment=False),
    "sau": dict(epochs=1, batch_size=32, lr=1e-3),
    "nc": dict(steps=2, batch_size=16, samples_per_step=16, unlearn_epochs=1, anomaly_threshold=1e-3),
}
"""Each precision-aware defense with settings that make it run every stage in seconds."""


def pass_dtypes(model: nn.Module) -> list[tuple[bool, torch.dtype]]:
    """Hooks the first convolution of ``model`` (the hook travels into the defenses' copies)
    and returns the list it fills with (train mode, output dtype) for every forward pass."""
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda module, inputs, output: seen.append((module.training, output.dtype)))
    return seen


@pytest.mark.parametrize("name", sorted(QUICK))
def test_amp_on_optimises_in_bfloat16_and_returns_a_float32_model(name, synthetic_backdoor):
    model = copy.deepcopy(synthetic_backdoor.model)
    seen = pass_dtypes(model)
    result = DEFENSES[name](**QUICK[name], amp="on").fit(model, synthetic_backdoor.clean)
    assert torch.bfloat16 in {dtype for _, dtype in seen}
    training = [dtype for train_mode, dtype in seen if train_mode]
    assert not training or training[-1] == torch.bfloat16  # the last optimisation too (FP's, TSBD's fine-tuning)
    for parameter in result.model.parameters():
        assert parameter.dtype == torch.float32 and parameter.is_contiguous()
    config = result.report["config"]
    assert config["amp"] == "on" and config["channels_last"] is True  # as it ran, resolved
    logits = result.model(synthetic_backdoor.clean.images[:4].float().div(255))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(QUICK))
def test_amp_off_and_float32_auto_compute_nothing_in_low_precision(name, synthetic_backdoor):
    # the suite sets RNP_AMP_AUTO=off, so "auto" resolves to float32 as on a CPU without bfloat16
    for amp in ("off", "auto"):
        model = copy.deepcopy(synthetic_backdoor.model)
        seen = pass_dtypes(model)
        result = DEFENSES[name](**QUICK[name], amp=amp).fit(model, synthetic_backdoor.clean)
        assert {dtype for _, dtype in seen} == {torch.float32}
        assert result.report["config"]["amp"] == "off" and result.report["config"]["channels_last"] is False


@pytest.mark.parametrize("name", sorted(QUICK))
def test_precision_fields_are_checked_and_left_out_of_float32_records(name):
    config_class = DEFENSES[name].config_class
    with pytest.raises(RnpError, match="amp must be one of auto, on, off"):
        config_class(amp="fast")
    with pytest.raises(RnpError, match="channels_last must be True or False"):
        config_class(channels_last="yes")
    record = config_record(resolve_precision(config_class(), "cpu"))
    assert not {"amp", "channels_last"} & set(record)  # a float32 record keys as before
    assert config_record(resolve_precision(config_class(amp="on"), "cpu"))["amp"] == "on"
