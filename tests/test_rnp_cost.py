"""RNP's cost floor (rnp.bench.cost) and the fast auto pruning rule against a reference."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from rnp import RNP
from rnp.bench.cost import optimisation_floor, rnp_floor_images
from rnp.defenses import prune_channels
from rnp.errors import RnpError
from rnp.training import predict

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(batch_size=32, recover_epochs=2, max_prune_fraction=0.2)


def counting(model):
    """A copy of ``model`` that counts the images of every forward pass run with gradients in
    train mode (the passes the floor stands for); copies of it count into the same list."""
    model, seen = copy.deepcopy(model), []

    def hook(module, inputs):
        if module.training and torch.is_grad_enabled():
            seen.append(len(inputs[0]))

    model.register_forward_pre_hook(hook)
    return model, seen


@pytest.fixture(scope="module")
def result(synthetic_backdoor):
    return RNP(**FAST).fit(synthetic_backdoor.model, synthetic_backdoor.clean)


def test_floor_images_are_each_unlearning_steps_batch_plus_recover_epochs():
    steps = [{"epoch": 1}, {"epoch": 1}, {"epoch": 1}, {"epoch": 2}]
    fake = SimpleNamespace(report={"clean_images": 300, "unlearning": {"per_step": steps},
                                   "config": {"batch_size": 128, "recover_epochs": 4}})
    assert rnp_floor_images(fake) == 128 + 128 + 44 + 128 + 4 * 300


def test_floor_images_equal_the_images_rnp_trains_on(synthetic_backdoor):
    model, seen = counting(synthetic_backdoor.model)
    result = RNP(**{**FAST, "batch_size": 64}, clean_threshold=0.1).fit(model, synthetic_backdoor.clean)
    assert result.report["unlearning"]["epochs"] >= 1  # one epoch on some fixture seeds, more on others
    assert rnp_floor_images(result) == sum(seen)


def test_floor_trains_exactly_the_images_asked_for_on_a_copy(synthetic_backdoor):
    model, seen = counting(synthetic_backdoor.model)
    model.eval()
    frozen = next(model.parameters()).requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    seconds = optimisation_floor(model, synthetic_backdoor.clean, images=450, batch_size=64)
    assert seconds > 0
    assert seen == [64] + [64, 64, 64, 8] * 2 + [50]  # warm-up, then 450 images in 200-image epochs
    assert not model.training and not frozen.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("amp, dtype", [("off", torch.float32), ("on", torch.bfloat16)])
def test_floor_trains_in_the_precision_and_layout_it_is_given(synthetic_backdoor, amp, dtype):
    model, layouts, dtypes = copy.deepcopy(synthetic_backdoor.model), [], []

    def hook(module, inputs, output):
        if module.training:
            dtypes.append(output.dtype)
            layouts.append(module.weight.is_contiguous(memory_format=torch.channels_last))

    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(hook)
    optimisation_floor(model, synthetic_backdoor.clean, images=64, batch_size=32, amp=amp, channels_last=True)
    assert dtypes == [dtype] * 3 and all(layouts)  # the warm-up step, then two


def test_floor_refuses_a_nonpositive_image_count(synthetic_backdoor):
    with pytest.raises(RnpError, match="positive"):
        optimisation_floor(synthetic_backdoor.model, synthetic_backdoor.clean, images=0)


def reference_auto_count(original, clean, scores, order, tolerance, max_fraction):
    """The auto rule written plainly: a fresh pruned copy and a full predict per candidate, the
    cost in images."""
    def correct(count):
        model = prune_channels(copy.deepcopy(original), scores, order[:count])
        return int((predict(model, clean) == clean.labels).sum())

    base, allowed = correct(0), int(tolerance * len(clean) + 1e-9)
    low, high, evaluated = 0, max(1, int(max_fraction * len(scores))), {0: base}
    while low < high:
        middle = (low + high + 1) // 2
        evaluated[middle] = correct(middle)
        low, high = (middle, high) if evaluated[middle] >= base - allowed else (low, middle - 1)
    return low, {k: v / len(clean) for k, v in evaluated.items()}


@pytest.mark.parametrize("tolerance", [0.0, 0.02, 0.1])
def test_auto_rule_chooses_what_the_reference_chooses_and_restores_the_model(result, synthetic_backdoor,
                                                                            tolerance):
    clean, scores, order = synthetic_backdoor.clean, result.masks, result.artifacts["order"]
    original = result.artifacts["original_model"]
    before = copy.deepcopy(original.state_dict())
    defense = RNP(**{**FAST, "tolerance": tolerance})
    count, selection = defense.choose_pruning(original, clean, scores, order, "cpu")
    expected, evaluated = reference_auto_count(original, clean, scores, order, tolerance, 0.2)
    assert count == expected
    assert selection["evaluated"] == {str(k): v for k, v in sorted(evaluated.items())}
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())


@pytest.mark.parametrize("tolerance, allowed", [(0.02, 10), (0.1, 50), (0.014, 7)])
def test_auto_rule_keeps_a_cost_of_exactly_the_tolerance(monkeypatch, tolerance, allowed):
    # 500 clean images, 490 right unpruned (Trojan's clean set 1 at width 32), and each pruned
    # channel costs one image: the rule must stop at exactly the images the tolerance allows,
    # where rounded accuracies (0.96 against 0.98 - 0.02) fall short
    import contextlib

    import rnp.defenses.rnp as rnp_module

    labels = torch.zeros(500, dtype=torch.long)

    @contextlib.contextmanager
    def pruned(model, scores, channels):
        yield len(channels)

    def predict_pruned(count, clean, **kwargs):
        predictions = labels.clone()
        predictions[:count] = 1
        predictions[-10:] = 1
        return predictions

    monkeypatch.setattr(rnp_module, "channels_pruned", pruned)
    monkeypatch.setattr(rnp_module, "predict", predict_pruned)
    clean, scores = SimpleNamespace(labels=labels), torch.zeros(200)
    defense = RNP(**{**FAST, "tolerance": tolerance, "max_prune_fraction": 1.0})
    count, selection = defense.choose_pruning(None, clean, scores, torch.arange(200), "cpu")
    assert count == allowed
    assert selection["clean_accuracy_before"] - selection["clean_accuracy_after"] == pytest.approx(allowed / 500)


def test_fit_prunes_the_reference_count_in_the_original(result, synthetic_backdoor):
    scores, order = result.masks, result.artifacts["order"]
    count, _ = reference_auto_count(result.artifacts["original_model"], synthetic_backdoor.clean,
                                    scores, order, 0.02, 0.2)
    assert result.report["pruning"]["pruned"] == count > 0
    expected = prune_channels(copy.deepcopy(synthetic_backdoor.model), scores, order[:count])
    assert all(torch.equal(expected.state_dict()[k], v) for k, v in result.model.state_dict().items())


def test_channels_last_trains_in_that_layout_and_leaves_the_pruned_model_in_the_callers(synthetic_backdoor):
    result = RNP(**FAST, channels_last=True).fit(synthetic_backdoor.model, synthetic_backdoor.clean)

    def filters(model):
        return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]

    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in filters(result.unlearned_model))
    assert all(w.is_contiguous() for w in filters(result.model))
