"""What every attack is: a pixel-space trigger, a label rule and a poisoning recipe.

An attack turns a clean training set into a poisoned one (recording exactly which images it
changed) and a clean test set into the triggered test set used to measure attack success. It
is a dataclass whose fields are all of its parameters, so ``spec()`` records everything needed
to rebuild the same triggered images; tensors it cannot derive from its fields (a user's blend
image, a trained trigger generator) are its ``artifacts()``.

Attacks come in three kinds, and the trainer handles all of them the same way:

- data poisoning only (BadNets, Blend, SIG, WaNet, ...): :meth:`Attack.poison`;
- fitting something before poisoning (:meth:`Attack.prepare`, called by the trainer on the
  clean training set): an Input-Aware mask generator, or, with ``needs_reference_model`` true,
  something derived from a clean *reference model* (an optimised Trojan trigger,
  label-consistent adversarial perturbations);
- acting during training (Input-Aware Dynamic, LIRA): :meth:`Attack.training_hook` returns a
  :class:`~rnp.training.hooks.TrainingHook` that the training loop calls on every batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from rnp.data.images import ImageSet, to_uint8
from rnp.data.poisoned import PoisonedSet, TriggeredSet
from rnp.errors import RnpError
from rnp.training.hooks import TrainingHook
from rnp.utils import generator_for

MODES = ("all2one", "all2all")


@dataclass(eq=False)
class Attack:
    """Base class: subclasses define ``name`` and :meth:`apply_trigger`."""

    name: ClassVar[str] = ""
    target: int = 0
    mode: str = "all2one"
    poison_rate: float = 0.1
    seed: int = 0

    def __post_init__(self):
        self.target = require_int("target", self.target)
        self.seed = require_int("seed", self.seed)
        self.poison_rate = require_float("poison_rate", self.poison_rate)
        if self.mode not in MODES:
            raise RnpError(f"unknown poisoning mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not 0 < self.poison_rate < 1:
            raise RnpError(f"poison rate must lie in (0, 1), got {self.poison_rate}")

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        """Adds the trigger to float images ``(N, C, H, W)`` in [0, 1]; returns new images."""
        raise NotImplementedError

    @property
    def needs_reference_model(self) -> bool:
        """Whether :meth:`prepare` must be given a clean model before :meth:`poison`."""
        return False

    def prepare(self, train: ImageSet, reference_model: nn.Module | None = None) -> None:
        """Fits what the attack needs before poisoning, from the clean training set and, when
        ``needs_reference_model``, a clean model trained on it. The default does nothing."""

    def training_hook(self, num_classes: int) -> TrainingHook | None:
        """The hook that runs this attack inside the training loop, or None for pure poisoning."""
        return None

    def load_artifacts(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restores artefacts that are not constructor fields (e.g. generator weights)."""
        if tensors:
            raise RnpError(f"attack {self.name!r} has no artefact {', '.join(sorted(tensors))}")

    def attack_labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The labels the attacker wants for triggered images of true class ``labels``."""
        if self.mode == "all2all":
            return (labels + 1) % num_classes
        return torch.full_like(labels, self.target)

    def select_poison_indices(self, train: ImageSet) -> torch.Tensor:
        """Which training images to poison: a seeded uniform draw of ``poison_rate`` of them."""
        count = max(1, round(self.poison_rate * len(train)))
        generator = generator_for(self.seed, "poison-indices")
        return seeded_draw(torch.arange(len(train)), count, generator)

    clean_label: ClassVar[bool] = False

    def describe_poisoning(self) -> str:
        """How much of the training data the attack changes, in words, for tables."""
        return f"{100 * self.poison_rate:g}%" + (", target class, labels kept" if self.clean_label else "")

    def target_class_indices(self, train: ImageSet) -> torch.Tensor:
        """For clean-label attacks: a seeded draw of ``poison_rate`` of the whole training set,
        taken among the images already in the target class."""
        self._check_target(train.num_classes)
        candidates = (train.labels == self.target).nonzero().squeeze(1)
        count = max(1, round(self.poison_rate * len(train)))
        if count > len(candidates):
            raise RnpError(f"poison rate {self.poison_rate} asks for {count} images but the target "
                           f"class has only {len(candidates)}")
        generator = generator_for(self.seed, "poison-indices")
        return seeded_draw(candidates, count, generator)

    def poison(self, train: ImageSet) -> PoisonedSet:
        """Stamps the trigger on the selected training images and relabels them."""
        self._check_target(train.num_classes)
        index = self.select_poison_indices(train)
        images, labels = train.images.clone(), train.labels.clone()
        images[index] = self.trigger_uint8(train.images[index])
        labels[index] = self.attack_labels(train.labels[index], train.num_classes)
        return PoisonedSet(train.with_images(images, labels), index)

    def triggered_test(self, test: ImageSet) -> TriggeredSet:
        """Triggers the test images; for all-to-one, target-class images are left out."""
        self._check_target(test.num_classes)
        if self.mode == "all2one":
            source = (test.labels != self.target).nonzero().squeeze(1)
        else:
            source = torch.arange(len(test))
        images = self.trigger_uint8(test.images[source])
        labels = test.labels[source]
        return TriggeredSet(test.with_images(images, labels),
                            self.attack_labels(labels, test.num_classes), source)

    def trigger_uint8(self, images: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
        """Applies the trigger to uint8 images and stores the result as 8-bit pixels again, the
        way a poisoned image file would be."""
        chunks = [to_uint8(self.apply_trigger(images[i:i + batch_size].float() / 255))
                  for i in range(0, len(images), batch_size)]
        return torch.cat(chunks) if chunks else images.clone()

    def spec(self) -> dict:
        """All parameters, JSON-serialisable, with the attack's registry name."""
        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init
                  and not _is_tensor_field(self, f.name)}
        return {"name": self.name, **{k: list(v) if isinstance(v, tuple) else v
                                      for k, v in params.items()}}

    def artifacts(self) -> dict[str, torch.Tensor]:
        """Tensors the spec cannot hold (empty unless the attack has a learned or given trigger)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if _is_tensor_field(self, f.name)}

    def _check_target(self, num_classes: int) -> None:
        if not 0 <= self.target < num_classes:
            raise RnpError(f"target label {self.target} is outside the {num_classes} classes")


def seeded_draw(candidates: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` of ``candidates`` drawn without repeats by ``generator``, in ascending order."""
    return candidates[torch.randperm(len(candidates), generator=generator)[:count]].sort().values


def require_int(name: str, value) -> int:
    """``value`` as an int, or an RnpError naming the parameter (bools and 4.5 are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise RnpError(f"attack parameter {name} must be an integer, got {value!r}")
    return int(value)


def require_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RnpError(f"attack parameter {name} must be a number, got {value!r}")
    return float(value)


def _is_tensor_field(attack: Attack, name: str) -> bool:
    return torch.is_tensor(getattr(attack, name))
