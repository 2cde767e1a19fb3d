"""Label-consistent (LC): hard-to-classify target-class images carrying a corner trigger.

Turner, Tsipras and Madry, "Label-Consistent Backdoor Attacks", 2019 (arXiv 1912.02771). A
clean-label attack: only images already in the target class are poisoned and their labels are
kept. Each is first made hard to classify by an L-inf bounded adversarial perturbation against a
clean reference model (PGD maximising the loss of its true label), so a model trained on it
leans on the trigger instead of the image content; then the trigger is stamped.

Defaults and their sources:

- trigger: the paper's 3x3 pattern in all four corners (its variant that survives flips and
  crops). Right corners carry rows ``[0, 0, 1], [0, 1, 0], [1, 0, 1]`` (1 white, 0 black) and
  left corners their left-right mirror, so a horizontal flip leaves the trigger unchanged. Each
  pattern pixel moves the image by ``+amplitude`` (white) or ``-amplitude`` (black), clipped to
  [0, 1]; ``amplitude`` 1 (the authors' released default, full visibility) sets the pixels to
  white and black; the paper's reduced-visibility triggers use 16/255, 32/255 or 64/255.
- ``epsilon`` 16/255: the paper's larger L-inf budget (it reports 8/255 and 16/255; the
  larger one makes the images harder and the attack stronger).
- PGD: ``steps`` 20 of ``step_size`` 2/255 from a uniform random start in the epsilon ball, the
  CIFAR-10 evaluation PGD of Madry et al. ("Towards Deep Learning Models Resistant to Adversarial
  Attacks", ICLR 2018); these are our choice, the LC paper is read here for its budgets only.
- ``poison_rate`` 0.05 of the whole training set (2 500 CIFAR-10 images, half the target
  class): the paper sweeps the number of poisoned target images; this is our choice of a
  setting in that range. Like every clean-label attack the rate cannot exceed the target
  class's share of the training set.

Only all-to-one is defined (the paper's setting): relabelling is not available to a clean-label
attack, so all-to-all is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rnp.attacks.base import Attack, require_float, require_int
from rnp.attacks.trojan import frozen_reference
from rnp.data.images import ImageSet, to_uint8
from rnp.data.poisoned import PoisonedSet
from rnp.errors import RnpError
from rnp.utils import generator_for

GRID_3X3 = ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 1.0))
CORNER = 3
BATCH_SIZE = 256


@dataclass(eq=False)
class LabelConsistent(Attack):
    """PGD-hardened target-class images with the four-corner trigger, labels kept.

    :meth:`prepare` must run first with a clean reference model: it computes the hardened images
    for exactly the indices :meth:`poison` uses and keeps them on the instance. They are
    training-set only; the test trigger is the corner patch alone (:meth:`apply_trigger`).
    """

    name: ClassVar[str] = "label_consistent"
    clean_label: ClassVar[bool] = True
    poison_rate: float = 0.05
    epsilon: float = 16 / 255
    step_size: float = 2 / 255
    steps: int = 20
    random_start: bool = True
    amplitude: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        self.epsilon = require_float("epsilon", self.epsilon)
        self.step_size = require_float("step_size", self.step_size)
        self.steps = require_int("steps", self.steps)
        self.amplitude = require_float("amplitude", self.amplitude)
        if self.mode != "all2one":
            raise RnpError("the label-consistent attack is all-to-one only: it cannot relabel images")
        if not 0 < self.epsilon <= 1 or self.step_size <= 0 or self.steps < 1:
            raise RnpError("label-consistent epsilon must lie in (0, 1], step_size be positive "
                           "and steps at least 1")
        if not 0 < self.amplitude <= 1:
            raise RnpError(f"label-consistent trigger amplitude must lie in (0, 1], got {self.amplitude}")
        if not isinstance(self.random_start, bool):
            raise RnpError(f"attack parameter random_start must be true or false, got {self.random_start!r}")
        self._hardened: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def needs_reference_model(self) -> bool:
        return True

    @property
    def hardened_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The poisoned indices and their adversarially perturbed uint8 images (no trigger yet)."""
        if self._hardened is None:
            raise RnpError(self._missing_prepare())
        index, _, hardened = self._hardened
        return index, hardened

    def corner_patches(self, height: int, width: int) -> list[tuple[slice, slice, torch.Tensor]]:
        """Each corner's rows, columns and signed ``(3, 3)`` pixel change (+/- ``amplitude``)."""
        if min(height, width) < 2 * CORNER:
            raise RnpError(f"the four-corner trigger needs images of at least {2 * CORNER}x{2 * CORNER},"
                           f" got {height}x{width}")
        right = (2 * torch.tensor(GRID_3X3) - 1) * self.amplitude
        left = right.flip(1)
        top, bottom = slice(0, CORNER), slice(height - CORNER, height)
        first, last = slice(0, CORNER), slice(width - CORNER, width)
        return [(top, first, left), (top, last, right), (bottom, first, left), (bottom, last, right)]

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        for rows, cols, change in self.corner_patches(*images.shape[-2:]):
            out[..., rows, cols] = (out[..., rows, cols] + change.to(out)).clamp(0, 1)
        return out

    def prepare(self, train: ImageSet, reference_model: nn.Module | None = None) -> None:
        """Hardens the target-class images :meth:`poison` will use, by PGD on ``reference_model``."""
        if reference_model is None:
            raise RnpError("the label-consistent attack needs a clean reference model to compute its "
                           "adversarial perturbations; pass reference_model to prepare")
        index = self.target_class_indices(train)
        clean = train.images[index]
        self._hardened = (index, clean.clone(), self._perturb(reference_model, clean, train.labels[index]))

    def poison(self, train: ImageSet) -> PoisonedSet:
        """Stamps the trigger on the hardened target-class images; every label is kept."""
        if self._hardened is None:
            raise RnpError(self._missing_prepare())
        index, clean, hardened = self._hardened
        if not (torch.equal(self.target_class_indices(train), index)
                and torch.equal(train.images[index], clean)):
            raise RnpError("the label-consistent attack was prepared on a different training set; "
                           "run prepare(train, reference_model) on this one")
        images = train.images.clone()
        images[index] = self.trigger_uint8(hardened)
        return PoisonedSet(train.with_images(images), index)

    def _missing_prepare(self) -> str:
        return ("the label-consistent attack has no reference model yet: call "
                "prepare(train, reference_model) with a clean model before poisoning")

    def _perturb(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """PGD in batches: uint8 images moved within ``epsilon`` to raise the loss of ``labels``."""
        start = torch.zeros(images.shape)
        if self.random_start:
            generator = generator_for(self.seed, "label-consistent-pgd-start")
            start = (torch.rand(images.shape, generator=generator) * 2 - 1) * self.epsilon
        out = []
        with frozen_reference(model) as device:
            for i in range(0, len(images), BATCH_SIZE):
                clean = images[i:i + BATCH_SIZE].to(device).float() / 255
                adversarial = self._pgd(model, clean, labels[i:i + BATCH_SIZE].to(device),
                                        start[i:i + BATCH_SIZE].to(device))
                out.append(to_uint8(adversarial).cpu())
        return torch.cat(out) if out else images.clone()

    def _pgd(self, model: nn.Module, clean: torch.Tensor, labels: torch.Tensor,
             start: torch.Tensor) -> torch.Tensor:
        low, high = (clean - self.epsilon).clamp(0, 1), (clean + self.epsilon).clamp(0, 1)
        images = (clean + start).clamp(low, high)
        for _ in range(self.steps):
            images.requires_grad_(True)
            loss = F.cross_entropy(model(images), labels, reduction="sum")
            grad, = torch.autograd.grad(loss, images)
            images = (images.detach() + self.step_size * grad.sign()).clamp(low, high)
        return images.detach()
