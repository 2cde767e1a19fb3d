"""How attacks plug into training: hooks in the training loop, reference models, cover samples,
and artefacts learned during training, checked with small stand-in attacks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import separable_image_set, tiny_cnn
from rnp.attacks import ATTACKS, Attack, BadNets, PoisonedSet, attack_from_spec
from rnp.bench.subjects import cached_subject
from rnp.errors import RnpError
from rnp.io.checkpoint import load_checkpoint
from rnp.runs.folder import load_run
from rnp.runs.training import train_run
from rnp.training import TrainConfig, run_epoch, train
from rnp.training.hooks import TrainingHook


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("RNP_CACHE_DIR", str(tmp_path / "cache"))
    yield
    torch.set_num_threads(threads)


class CountingHook(TrainingHook):
    """Relabels every batch to class 0, adds ``weight.sum()`` as extra loss, counts updates."""

    def __init__(self):
        self.weight = torch.zeros(3, requires_grad=True)
        self.updates = torch.zeros((), dtype=torch.long)
        self.epochs_started: list[int] = []
        self.grads: list[torch.Tensor] = []

    def start_epoch(self, epoch, epochs):
        self.epochs_started.append(epoch)

    def transform(self, model, images, labels):
        return images, torch.zeros_like(labels), self.weight.sum() * 2

    def after_update(self):
        self.grads.append(self.weight.grad.clone())
        self.weight.grad = None
        self.updates += 1

    def state_dict(self):
        return {"updates": self.updates.clone()}

    def load_state_dict(self, state):
        self.updates = state["updates"].clone()


def test_run_epoch_trains_on_the_hooks_batch_and_extra_loss():
    data = separable_image_set(n=32, num_classes=2)
    model = tiny_cnn(num_classes=2)
    hook = CountingHook()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        stats = run_epoch(model, data, optimizer, batch_size=8, augment=False, hook=hook)
    assert int(hook.updates) == 3 * stats.steps == 12
    assert all(torch.equal(grad, torch.full((3,), 2.0)) for grad in hook.grads)
    with torch.no_grad():
        predictions = model(data.images.float() / 255).argmax(1)
    assert (predictions == 0).all()  # learned the hook's labels, not the data's


class PrecisionHook(TrainingHook):
    """Records the dtype of the classifier's logits in each ``transform``."""

    def __init__(self):
        self.dtypes: list[torch.dtype] = []

    def transform(self, model, images, labels):
        self.dtypes.append(model(images).dtype)
        return images, labels, None


@pytest.mark.parametrize("mixed", [False, True])
def test_a_hooks_passes_run_in_the_steps_precision(mixed):
    data = separable_image_set(n=16, num_classes=2)
    model, hook = tiny_cnn(num_classes=2), PrecisionHook()
    scaler = torch.amp.GradScaler("cpu", enabled=mixed)
    run_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=8, augment=False,
              hook=hook, scaler=scaler)
    assert hook.dtypes == [torch.bfloat16 if mixed else torch.float32] * 2


def test_hook_state_survives_checkpointed_resume(tmp_path):
    data = separable_image_set(n=16, num_classes=2)
    config = TrainConfig(epochs=2, batch_size=8, augment=False)
    uninterrupted = CountingHook()
    train(tiny_cnn(), data, config, progress=False, hook=uninterrupted)
    assert uninterrupted.epochs_started == [0, 1] and int(uninterrupted.updates) == 4

    def stop_after_first_epoch(epoch, stats):
        if epoch == 0:
            raise KeyboardInterrupt

    checkpoint = tmp_path / "ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cnn(), data, config, progress=False, hook=CountingHook(), checkpoint=checkpoint,
              on_epoch=stop_after_first_epoch)
    assert int(load_checkpoint(checkpoint)[0]["hook.updates"]) == 2
    resumed = CountingHook()
    train(tiny_cnn(), data, config, progress=False, hook=resumed, checkpoint=checkpoint)
    assert resumed.epochs_started == [1]
    assert int(resumed.updates) == 4  # two restored from the checkpoint, two run now


# -- stand-in attacks -------------------------------------------------------------------------


@dataclass(eq=False)
class NeedsReference(BadNets):
    """BadNets whose patch value is the reference model's first weight sign, to prove it ran."""

    name: ClassVar[str] = "needs_reference"
    seen_reference: ClassVar[list] = []

    @property
    def needs_reference_model(self) -> bool:
        return True

    def prepare(self, train, reference_model=None):
        assert reference_model is not None and not reference_model.training
        NeedsReference.seen_reference.append(reference_model)


@dataclass(eq=False)
class WithCover(BadNets):
    """BadNets that also stamps the next few images without relabelling them."""

    name: ClassVar[str] = "with_cover"

    def poison(self, train):
        poisoned = super().poison(train)
        candidates = torch.tensor([i for i in range(len(train)) if i not in set(poisoned.poisoned_indices.tolist())])
        cover = candidates[:3]
        images = poisoned.data.images.clone()
        images[cover] = self.trigger_uint8(train.images[cover])
        return PoisonedSet(poisoned.data.with_images(images, poisoned.data.labels), poisoned.poisoned_indices, cover)


@dataclass(eq=False)
class LearnsDuringTraining(Attack):
    """A blend whose pattern is a parameter the hook nudges on every batch."""

    name: ClassVar[str] = "learns_during_training"

    def __post_init__(self):
        super().__post_init__()
        self._pattern = torch.zeros(3, 1, 1)

    def apply_trigger(self, images):
        return (images + self._pattern).clamp(0, 1)

    def training_hook(self, num_classes):
        attack = self

        class Nudge(TrainingHook):
            def after_update(self):
                attack._pattern += 0.01

        return Nudge()

    def artifacts(self):
        return {"learned_pattern": self._pattern.clone()}

    def load_artifacts(self, tensors):
        self._pattern = tensors["learned_pattern"].clone()


@pytest.fixture
def registered(monkeypatch):
    for cls in (NeedsReference, WithCover, LearnsDuringTraining):
        monkeypatch.setitem(ATTACKS, cls.name, cls)


def write_image_folder(root, n_train=24, n_test=12, classes=2, size=16):
    rng = np.random.default_rng(0)
    for split, count in (("train", n_train), ("test", n_test)):
        for index in range(count):
            label = index % classes
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(60 + 120 * label + rng.integers(-30, 30, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index}.png")
    return str(root)


TINY = dict(arch="preact_resnet18", width=4, config=TrainConfig(epochs=1, batch_size=8), progress=False,
            log=lambda line: None)


def test_attack_needing_a_reference_model_refuses_to_train_without_one(registered, tmp_path):
    data = write_image_folder(tmp_path / "data")
    with pytest.raises(RnpError, match="reference-run"):
        train_run(tmp_path / "run", data, attack=NeedsReference(poison_rate=0.2), **TINY)


def test_reference_model_must_be_clean_and_is_recorded(registered, tmp_path):
    data = write_image_folder(tmp_path / "data")
    backdoored = train_run(tmp_path / "bd", data, attack=BadNets(poison_rate=0.2), **TINY)
    with pytest.raises(RnpError, match="must be a clean model"):
        train_run(tmp_path / "run", data, attack=NeedsReference(poison_rate=0.2), reference_run=backdoored, **TINY)
    NeedsReference.seen_reference.clear()
    lines = []
    run = cached_subject(tmp_path / "cache-runs", data, NeedsReference(poison_rate=0.2),
                         **{**TINY, "log": lines.append})
    assert len(NeedsReference.seen_reference) == 1
    reference, subject = [line for line in lines if line.startswith("training ")]  # each says what it trains
    assert reference.startswith("training the clean model needs_reference is fitted on, ")
    assert subject.startswith("training subject ") and reference.split(": ")[0][-29:] != subject.split(": ")[0][-29:]
    loaded = load_run(run)
    reference = loaded.info["reference_run"]
    assert load_run(reference["path"]).attack is None and len(reference["model_sha256"]) == 64
    assert cached_subject(tmp_path / "cache-runs", data, NeedsReference(poison_rate=0.2), **TINY) == run
    assert len(NeedsReference.seen_reference) == 1  # cached: not trained or prepared again


def test_cover_indices_are_recorded_and_kept_out_of_the_clean_pool(registered, tmp_path):
    data = write_image_folder(tmp_path / "data")
    run = load_run(train_run(tmp_path / "run", data, attack=WithCover(poison_rate=0.25), **TINY))
    assert len(run.cover_indices) == 3 and len(run.poisoned_indices) == 6
    assert not set(run.cover_indices.tolist()) & set(run.poisoned_indices.tolist())
    _, exclude = run.clean_pool()
    assert set(exclude.tolist()) == set(run.cover_indices.tolist()) | set(run.poisoned_indices.tolist())


def test_artifacts_learned_during_training_are_saved_and_reloaded(registered, tmp_path):
    data = write_image_folder(tmp_path / "data")
    attack = LearnsDuringTraining(poison_rate=0.25)
    run = load_run(train_run(tmp_path / "run", data, attack=attack, **TINY))
    assert torch.allclose(run.attack._pattern, torch.full((3, 1, 1), 0.03))  # 24 images / batch 8
    triggered = run.triggered_test()
    assert torch.equal(triggered.data.images, attack.triggered_test(run.data.test).data.images)


def test_attack_from_spec_routes_artifacts(registered):
    attack = attack_from_spec({"name": "learns_during_training", "poison_rate": 0.1},
                              {"learned_pattern": torch.ones(3, 1, 1)})
    assert torch.equal(attack._pattern, torch.ones(3, 1, 1))
    with pytest.raises(RnpError, match="no artefact"):
        attack_from_spec({"name": "badnets"}, {"generator.weight": torch.ones(1)})
    with pytest.raises(RnpError, match="unknown attack"):
        attack_from_spec({"name": "nope"})
