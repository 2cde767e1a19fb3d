"""Input-Aware Dynamic attack: mask pre-training, the per-batch hook, G's joint training,
artefacts, and exact resumption from a checkpoint."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
from helpers import tiny_cnn, tiny_image_set

from rnp.attacks import ATTACKS, attack_from_spec
from rnp.attacks.input_aware import InputAware, diversity_loss, soft_threshold
from rnp.data.images import ImageSet
from rnp.errors import RnpError
from rnp.io.checkpoint import load_checkpoint, save_checkpoint
from rnp.training import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3
# Few steps leave BatchNorm running statistics stale, so tests take small batches: 12 mask steps,
# 16 hook steps with a backdoor and a cross image in each batch of 5.
SMALL = {"generator_width": 8, "mask_epochs": 1, "mask_batch_size": 4, "poison_rate": 0.2, "cross_rate": 0.2}


def train_set(n: int = 48) -> ImageSet:
    return tiny_image_set(n=n, num_classes=K, size=16, seed=3)


def prepared(**params) -> InputAware:
    attack = InputAware(**{**SMALL, **params})
    attack.prepare(train_set())
    return attack


def train_attack(attack: InputAware, epochs: int = 2, **kwargs) -> torch.nn.Module:
    model = tiny_cnn(num_classes=K, seed=1)
    config = TrainConfig(epochs=epochs, batch_size=5, lr=0.05, augment=False)
    train(model, train_set(40), config, hook=attack.training_hook(K), progress=False, **kwargs)
    return model


@pytest.fixture(scope="module")
def trained() -> InputAware:
    attack = prepared()
    train_attack(attack)
    return attack


def images(n: int = 6, seed: int = 5) -> torch.Tensor:
    return tiny_image_set(n=n, num_classes=K, size=16, seed=seed).images.float() / 255


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_mode_density(attack: InputAware) -> float:
    """Mean thresholded mask with batch statistics, as the phase-1 loss sees it."""
    net = copy.deepcopy(attack._mask_net).train()
    with torch.no_grad():
        return float(soft_threshold(net(images(16))).mean())


# --- phase 1 ---------------------------------------------------------------------------------

def test_mask_pretraining_moves_density_toward_target():
    attack = InputAware(**SMALL)
    attack.build_generators(3)
    before = train_mode_density(attack)
    attack.prepare(train_set())
    after = train_mode_density(attack)
    assert after < before - 0.1
    assert abs(after - attack.mask_density) < abs(before - attack.mask_density)


def test_mask_generator_does_not_touch_the_global_random_state():
    state = torch.random.get_rng_state()
    prepared()
    assert torch.equal(torch.random.get_rng_state(), state)


def test_generators_are_built_from_generator_seed():
    a, b, c = InputAware(**SMALL), InputAware(**SMALL), InputAware(**SMALL, generator_seed=1)
    for attack in (a, b, c):
        attack.build_generators(3)
    assert same(weights(a._pattern_net), weights(b._pattern_net))
    assert same(weights(a._mask_net), weights(b._mask_net))
    assert not same(weights(a._pattern_net), weights(c._pattern_net))


def test_diversity_loss_values():
    zeros, ones = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert float(diversity_loss(zeros, ones, zeros, ones / 2)) == pytest.approx(2.0)
    outputs = torch.full((2, 3, 4, 4), 0.3, requires_grad=True)
    diversity_loss(zeros, zeros, outputs, outputs.detach()).backward()  # identical outputs
    assert torch.isfinite(outputs.grad).all()


# --- phase 2: the hook -----------------------------------------------------------------------

def test_hook_batch_has_backdoor_cross_and_clean_parts():
    attack = prepared(target=0, poison_rate=0.2, cross_rate=0.3)
    hook = attack.training_hook(K)
    batch = images(20)
    labels = 1 + torch.arange(20) % (K - 1)  # no image of the target class
    out, out_labels, extra = hook.transform(None, batch, labels)
    assert out.shape == batch.shape and out_labels.shape == labels.shape
    assert (out_labels[:4] == 0).all() and (out_labels[4:] != 0).all()
    assert not Counter(out_labels[4:].tolist()) - Counter(labels.tolist())  # true labels kept
    clean = out[10:]
    assert all(any(torch.equal(image, original) for original in batch) for image in clean)
    assert not any(torch.equal(out[0], original) for original in batch)
    assert out.requires_grad and not batch.requires_grad  # attached to G's graph
    assert extra is not None and torch.isfinite(extra) and float(extra.detach()) > 0
    assert 0 <= float(out.detach().min()) and float(out.detach().max()) <= 1


def test_hook_all2all_shifts_the_backdoor_labels():
    attack = prepared(mode="all2all", poison_rate=0.25, cross_rate=0.25)
    labels = torch.arange(16) % K
    _, out_labels, _ = attack.training_hook(K).transform(None, images(16), labels)
    restored = torch.cat([(out_labels[:4] - 1) % K, out_labels[4:]])
    assert Counter(restored.tolist()) == Counter(labels.tolist())
    assert not torch.equal(torch.sort(out_labels).values, torch.sort(labels).values)


def test_training_changes_the_pattern_generator_and_the_classifier_but_not_the_mask():
    attack = prepared()
    pattern, mask = weights(attack._pattern_net), weights(attack._mask_net)
    model = tiny_cnn(num_classes=K, seed=1)
    initial = weights(model)
    train(model, train_set(40), TrainConfig(epochs=1, batch_size=10, lr=0.05, augment=False),
          hook=attack.training_hook(K), progress=False)
    conv = "layers.0.0.weight"
    assert not torch.equal(attack._pattern_net.state_dict()[conv], pattern[conv])
    assert not same(weights(model), initial)
    assert same(weights(attack._mask_net), mask)


# --- the trigger and artefacts ---------------------------------------------------------------

def test_triggers_are_input_aware_deterministic_and_in_range(trained):
    batch = images(6)
    original = batch.clone()
    out = trained.apply_trigger(batch)
    assert torch.equal(batch, original)
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    assert torch.equal(out, trained.apply_trigger(batch))
    opposite = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16)])
    patterns, masks = trained.patterns(opposite), trained.masks(opposite)
    # Opposite inputs get other patterns and masks. How far apart depends on the few training
    # steps: over fixture seeds 0-4 the patterns differed by 0.005-0.59 and the masks by 0.12-0.97
    # at most, so the bounds sit well below those and far above rounding noise (1e-7).
    assert (patterns[0] - patterns[1]).abs().max() > 1e-3
    assert (masks[0] - masks[1]).abs().max() > 2e-2
    assert not torch.equal(out, batch)


def test_odd_sizes_are_padded_and_cropped(trained):
    out = trained.apply_trigger(torch.rand(2, 3, 13, 10))
    assert out.shape == (2, 3, 13, 10)
    with pytest.raises(RnpError):
        trained.apply_trigger(torch.rand(2, 1, 16, 16))


def test_artifacts_round_trip_to_identical_triggered_images(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(ATTACKS, "input_aware", InputAware)
    path = tmp_path / "attack.safetensors"
    save_checkpoint(path, trained.artifacts())
    spec = json.loads(json.dumps(trained.spec()))
    rebuilt = attack_from_spec(spec, load_checkpoint(path)[0])
    test = tiny_image_set(n=9, num_classes=K, size=16, seed=8)
    assert torch.equal(rebuilt.triggered_test(test).data.images, trained.triggered_test(test).data.images)
    assert rebuilt.spec() == trained.spec()
    assert all(k.startswith(("pattern_generator.", "mask_generator.")) for k in trained.artifacts())


def test_untrained_attack_refuses_to_trigger():
    attack = InputAware(**SMALL)
    assert attack.artifacts() == {}
    with pytest.raises(RnpError):
        attack.apply_trigger(images(2))
    with pytest.raises(RnpError):
        attack.training_hook(K)
    attack.prepare(train_set())
    with pytest.raises(RnpError):  # G is still untrained
        attack.apply_trigger(images(2))
    with pytest.raises(RnpError):
        attack.load_artifacts({"something": torch.zeros(1)})


def test_poison_leaves_the_training_set_unchanged():
    data = train_set()
    poisoned = InputAware(**SMALL).poison(data)
    assert torch.equal(poisoned.data.images, data.images) and torch.equal(poisoned.data.labels, data.labels)
    assert len(poisoned.poisoned_indices) == 0


@pytest.mark.parametrize("params", [{"cross_rate": 0.95}, {"mask_density": 0}, {"generator_width": 0},
                                    {"mask_epochs": 1.5}, {"generator_milestones": [0.5, 2]},
                                    {"adam_betas": [0.5]}, {"lambda_div": -1}])
def test_rejects_bad_parameters(params):
    with pytest.raises(RnpError):
        InputAware(**params)


# --- resumption ------------------------------------------------------------------------------

def test_checkpointed_resume_matches_an_uninterrupted_run(tmp_path):
    straight = prepared()
    straight_model = train_attack(straight, epochs=2)

    class Interrupted(Exception):
        pass

    def crash(epoch, stats):
        raise Interrupted

    checkpoint = tmp_path / "checkpoint.safetensors"
    with pytest.raises(Interrupted):
        train_attack(prepared(), epochs=2, checkpoint=checkpoint, on_epoch=crash)
    resumed, epochs_run = prepared(), []
    resumed_model = train_attack(resumed, epochs=2, checkpoint=checkpoint,
                                 on_epoch=lambda epoch, stats: epochs_run.append(epoch))
    assert epochs_run == [1]
    assert same(weights(resumed_model), weights(straight_model))
    assert same(resumed.artifacts(), straight.artifacts())
    assert torch.equal(resumed.apply_trigger(images()), straight.apply_trigger(images()))


def test_triggered_test_leaves_out_the_target_class(trained):
    test = tiny_image_set(n=12, num_classes=K, size=16, seed=5)
    triggered = trained.triggered_test(test)
    assert torch.equal(triggered.source_indices, (test.labels != trained.target).nonzero().squeeze(1))
    assert (triggered.target_labels == trained.target).all()
    assert torch.equal(triggered.data.labels, test.labels[triggered.source_indices])
    assert not torch.equal(triggered.data.images, test.images[triggered.source_indices])
