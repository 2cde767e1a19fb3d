"""LIRA: the bounded learned trigger, its two training stages, artefacts and exact resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import separable_image_set, tiny_cnn, tiny_image_set

from rnp.attacks import ATTACKS, attack_from_spec
from rnp.attacks.lira import Lira
from rnp.errors import RnpError
from rnp.training import TrainConfig, train

NARROW = {"generator_width": 4, "eps": 0.05}


class Interrupted(Exception):
    pass


def config(**changes) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 8, "lr": 0.05, "seed": 1, **changes})


def weights(attack: Lira) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in attack.generator(3).state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained() -> Lira:
    """An attack whose T took 12 steps (two stage-I epochs, a fast lr) on a tiny classifier."""
    attack = Lira(**NARROW, generator_lr=1e-2, joint_fraction=1.0)
    train(tiny_cnn(num_classes=3, batch_norm=True), tiny_image_set(n=48), config(), progress=False,
          hook=attack.training_hook(3))
    return attack


# --- the trigger -----------------------------------------------------------------------------

def test_trigger_is_within_eps_and_in_unit_range(trained):
    images = torch.rand(6, 3, 8, 8)
    images[0], images[1] = 0.0, 1.0  # clipping must hold at both ends
    original = images.clone()
    out = trained.apply_trigger(images)
    assert torch.equal(images, original)  # the input is not modified
    assert out.min() >= 0 and out.max() <= 1
    change = (out - images).abs()
    assert change.max() <= trained.eps + 1e-6
    assert change[2:].max() > 0.2 * trained.eps  # the trigger is really there
    assert torch.equal(trained.apply_trigger(images), out)  # deterministic


def test_trigger_differs_per_input(trained):
    generator = torch.Generator().manual_seed(0)
    images = torch.stack([0.1 + 0.2 * torch.rand(3, 8, 8, generator=generator),
                          0.7 + 0.2 * torch.rand(3, 8, 8, generator=generator)])
    delta = trained.apply_trigger(images) - images  # no pixel near 0 or 1: nothing is clipped
    # not one fixed pattern: the two deltas differed by 0.09 eps at least over fixture seeds 0-4
    assert (delta[0] - delta[1]).abs().max() > 0.02 * trained.eps


def test_batched_trigger_equals_one_pass(trained):
    images = torch.rand(7, 3, 8, 8)
    assert torch.allclose(trained.apply_trigger(images, batch_size=3), trained.apply_trigger(images),
                          atol=1e-6)


def test_untrained_generator_refuses_and_small_images_raise(trained):
    with pytest.raises(RnpError, match="never trained"):
        Lira(**NARROW).apply_trigger(torch.rand(1, 3, 8, 8))
    with pytest.raises(RnpError, match="at least 8"):
        trained.apply_trigger(torch.rand(1, 3, 4, 4))


# --- training ----------------------------------------------------------------------------------

def test_stage_one_trains_the_generator_and_stage_two_freezes_it():
    attack = Lira(**NARROW)  # the default joint_fraction makes 1 of 2 epochs stage I
    assert attack.joint_epochs(2) == 1
    initial = weights(attack)
    after_epoch = []
    train(tiny_cnn(num_classes=3, batch_norm=True), tiny_image_set(n=24), config(), progress=False,
          hook=attack.training_hook(3), on_epoch=lambda epoch, stats: after_epoch.append(weights(attack)))
    assert not same(after_epoch[0], initial)
    assert same(after_epoch[1], after_epoch[0])


def test_generator_steps_lower_the_target_loss_of_a_fixed_classifier():
    data = separable_image_set(n=16, num_classes=2)
    images, labels = data.images.float() / 255, data.labels
    model = tiny_cnn(num_classes=2)  # a classifier that reads brightness, then held fixed
    train(model, data, TrainConfig(epochs=10, batch_size=8, lr=0.2, augment=False, schedule="constant"),
          progress=False)
    model.zero_grad(set_to_none=True)
    attack = Lira(generator_width=4, eps=0.2, generator_lr=0.01, target=0)
    classifier = {k: v.clone() for k, v in model.state_dict().items()}
    targets = torch.zeros_like(labels)

    def target_loss() -> float:
        with torch.no_grad():
            triggered = attack.perturb(attack.generator(3).eval(), images)
            return float(F.cross_entropy(model(triggered), targets))

    before = target_loss()
    hook = attack.training_hook(2)
    for _ in range(20):
        hook.transform(model, images, labels)
    assert target_loss() < before  # 20 steps: to 0.75 and 0.94 of it on fixture seeds 2 and 3
    assert same(model.state_dict(), classifier)  # T's optimiser never touches the classifier
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("mode, alpha, copies", [("all2one", 0.5, 8), ("all2all", 0.5, 8),
                                                 ("all2one", 0.75, 3), ("all2one", 0.2, 32)])
def test_classifier_batch_is_clean_images_then_relabelled_triggered_copies(mode, alpha, copies):
    data = tiny_image_set(n=8)
    images, labels = data.images.float() / 255, data.labels
    attack = Lira(generator_width=4, mode=mode, alpha=alpha, target=2)
    hook = attack.training_hook(3)
    hook.start_epoch(1, 2)  # stage II: T fixed
    out, out_labels, extra = hook.transform(tiny_cnn(num_classes=3), images, labels)
    assert extra is None
    assert len(out) == 8 + copies and len(out_labels) == 8 + copies
    assert torch.equal(out[:8], images) and torch.equal(out_labels[:8], labels)
    # clean weight in the mean CE: B / (B + m) matches alpha
    assert 8 / (8 + copies) == pytest.approx(alpha, abs=0.05)
    copied = [int(torch.nonzero((images - t).abs().amax((1, 2, 3)) <= attack.eps + 1e-6)[0])
              for t in out[8:]]
    expected = (labels[copied] + 1) % 3 if mode == "all2all" else torch.full((copies,), 2)
    assert torch.equal(out_labels[8:], expected)
    if alpha == 0.5:
        assert sorted(copied) == list(range(8))  # every image once clean, once triggered


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    data = tiny_image_set(n=24)
    params = dict(**NARROW, alpha=0.75, joint_fraction=1.0)  # both epochs move T and draw copies
    reference = Lira(**params)
    reference_model = tiny_cnn(num_classes=3, batch_norm=True)
    reference_history = train(reference_model, data, config(), progress=False,
                              hook=reference.training_hook(3))

    checkpoint = tmp_path / "lira.safetensors"

    def interrupt(epoch, stats):
        if epoch == 0:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(tiny_cnn(num_classes=3, batch_norm=True), data, config(), checkpoint=checkpoint,
              progress=False, hook=Lira(**params).training_hook(3), on_epoch=interrupt)
    resumed = Lira(**params)  # a fresh process: T comes from the checkpoint
    resumed_model = tiny_cnn(num_classes=3, batch_norm=True, seed=7)
    history = train(resumed_model, data, config(), checkpoint=checkpoint, progress=False,
                    hook=resumed.training_hook(3))
    assert history == reference_history
    assert same(resumed_model.state_dict(), reference_model.state_dict())
    assert same(resumed.artifacts(), reference.artifacts())


def test_resume_without_hook_state_raises():
    with pytest.raises(RnpError, match="no LIRA state"):
        Lira(**NARROW).training_hook(3).load_state_dict({})


# --- artefacts, spec, seeding ----------------------------------------------------------------

def test_artifacts_round_trip_through_the_registry(trained, monkeypatch):
    monkeypatch.setitem(ATTACKS, "lira", Lira)
    spec = json.loads(json.dumps(trained.spec()))
    assert spec["name"] == "lira" and spec["generator_width"] == 4 and "_generator" not in spec
    artifacts = trained.artifacts()
    assert artifacts and all(k.startswith("generator.") for k in artifacts)
    rebuilt = attack_from_spec(spec, artifacts)
    test = tiny_image_set(n=12, seed=5)
    assert torch.equal(rebuilt.triggered_test(test).data.images, trained.triggered_test(test).data.images)
    images = torch.rand(4, 3, 8, 8)
    assert torch.equal(rebuilt.apply_trigger(images), trained.apply_trigger(images))


def test_bad_artifacts_raise(trained):
    with pytest.raises(RnpError, match="no artefact"):
        Lira(**NARROW).load_artifacts({"pattern": torch.zeros(3)})
    with pytest.raises(RnpError, match="width-8"):
        Lira(eps=0.05, generator_width=8).load_artifacts(trained.artifacts())
    assert Lira(**NARROW).artifacts() == {}  # nothing to save before training


def test_generator_init_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    first = weights(Lira(generator_width=4, generator_seed=3))
    assert torch.equal(torch.get_rng_state(), state)
    assert same(weights(Lira(generator_width=4, generator_seed=3)), first)
    assert not same(weights(Lira(generator_width=4, generator_seed=4)), first)


def test_poison_leaves_the_training_set_unchanged():
    train_set = tiny_image_set(n=10)
    poisoned = Lira(**NARROW).poison(train_set)
    assert poisoned.data is train_set and len(poisoned.poisoned_indices) == 0


def test_defaults_and_stage_split():
    attack = Lira()
    assert (attack.eps, attack.alpha, attack.generator_lr, attack.generator_width) == (0.01, 0.5, 1e-4, 64)
    assert [attack.joint_epochs(n) for n in (1, 2, 11, 60, 550)] == [1, 1, 1, 5, 50]
    assert Lira(joint_fraction=1.0).joint_epochs(7) == 7


@pytest.mark.parametrize("params", [{"eps": 0}, {"eps": 1.5}, {"alpha": 1}, {"alpha": 0},
                                    {"generator_lr": 0}, {"joint_fraction": 0}, {"joint_fraction": 1.1},
                                    {"generator_width": 0}, {"generator_width": 2.5},
                                    {"generator_seed": "x"}])
def test_bad_parameters_raise(params):
    with pytest.raises(RnpError):
        Lira(**params)


def test_target_outside_the_classes_raises():
    with pytest.raises(RnpError):
        Lira(target=5).training_hook(3)


def test_triggered_test_leaves_out_the_target_class(trained):
    test = tiny_image_set(n=12, num_classes=3, seed=5)
    triggered = trained.triggered_test(test)
    assert torch.equal(triggered.source_indices, (test.labels != trained.target).nonzero().squeeze(1))
    assert (triggered.target_labels == trained.target).all()
    assert torch.equal(triggered.data.labels, test.labels[triggered.source_indices])
    assert not torch.equal(triggered.data.images, test.images[triggered.source_indices])
