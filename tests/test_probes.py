"""The model probes of :mod:`rnp.models.probes`: eval mode for a block and activation capture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rnp.models import capture_activations, eval_mode


def small_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_models_mode_also_after_an_error(training):
    model = small_model().train(training)
    with eval_mode(model) as inside:
        assert inside is model and not any(m.training for m in model.modules())
    assert all(m.training == training for m in model.modules())
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("the block failed")
    assert all(m.training == training for m in model.modules())


def test_capture_records_outputs_and_inputs_of_every_pass_then_unhooks():
    model = small_model().eval()
    first, last = model[0], model[3]
    outputs, inputs = [], []
    with capture_activations({"first": first}, lambda name, t: outputs.append((name, t))), \
            capture_activations({"last": last}, lambda name, t: inputs.append((name, t)), inputs=True):
        batches = [torch.randn(5, 4), torch.randn(2, 4)]
        results = [model(batch) for batch in batches]
    assert [name for name, _ in outputs] == ["first", "first"] and [name for name, _ in inputs] == ["last"] * 2
    for batch, (_, output) in zip(batches, outputs):
        assert torch.equal(output, first(batch))
    for result, (_, features) in zip(results, inputs):
        assert torch.equal(last(features), result)  # the last layer's own input, left unchanged
    model(torch.randn(3, 4))
    assert len(outputs) == len(inputs) == 2  # the hooks are gone
    assert not first._forward_hooks and not last._forward_pre_hooks


def test_captured_tensors_keep_their_graph():
    model = small_model()
    kept = {}
    with capture_activations({"hidden": model[1]}, kept.__setitem__):
        model(torch.randn(4, 4))
    kept["hidden"].sum().backward()
    assert model[0].weight.grad is not None
