"""Low-Frequency (LF): a smooth additive trigger with no high-frequency content.

Zeng, Park, Mao and Jia, "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective",
ICCV 2021 (arXiv 2104.03413). Most triggers leave strong high-frequency artefacts that a simple
frequency-domain detector spots; the paper's answer is a trigger built as a universal adversarial
perturbation toward the target label, kept smooth by a low-pass filter and small by a norm bound.

Here the trigger is one additive pattern ``p`` of shape ``(C, H, W)`` confined to a low-pass
window of the orthonormal 2-D DCT-II (coefficients ``(u, v)`` with ``u < cutoff * H`` and
``v < cutoff * W`` in every channel) and bounded by ``|p| <= epsilon``; a triggered image is
``clip(x + p, 0, 1)``.

- Default pattern: uniform noise drawn from ``pattern_seed``, projected onto the low-pass window
  and rescaled so its largest magnitude is exactly ``epsilon``. It needs no reference model and no
  artefact.
- ``optimize=True``: :meth:`LowFrequency.prepare` crafts ``p`` on a clean reference model, as
  the paper does in spirit: starting from the seeded pattern, ``craft_steps`` signed-gradient
  steps of size ``craft_step_size`` descend the cross-entropy toward the attacker's labels on
  ``craft_images`` training images (target-class images left out for all-to-one); after every
  step ``p`` is projected onto the low-pass window and scaled back into the L-inf ball (scaling,
  not clipping, so it stays in the window). The result is stored in the tensor field ``pattern``,
  which :meth:`~rnp.attacks.base.Attack.artifacts` saves and the constructor restores.

Defaults and their sources. The authors' released code smooths the perturbation with a Gaussian
filter of standard deviation 6 pixels on 32x32 CIFAR-10 images and rescales it into [0, 0.2]:
``epsilon`` 0.2 is that L-inf budget (applied symmetrically here, so the pattern may also darken
pixels). That Gaussian passes under 7% of the amplitude from the fifth DCT frequency on, so the
ideal window keeps the first 4 of 32 frequencies per axis: ``cutoff`` 0.125. The authors fit the
perturbation on 100 training images with DeepFool-style updates; the signed-gradient crafting
(``craft_images`` 256, ``craft_steps`` 100, ``craft_step_size`` 0.01) is a simpler, deterministic
stand-in with a few hundred images for a steadier universal direction. The authors also let the
target follow the label the perturbation drifts to; here the target is fixed by ``target``.
All-to-one and all-to-all poisoning use the standard recipe (``poison_rate`` 0.1 by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rnp.attacks.base import Attack, require_float, require_int
from rnp.data.images import ImageSet
from rnp.errors import RnpError
from rnp.models.probes import eval_mode
from rnp.utils import generator_for

CRAFT_BATCH = 128
SPECTRUM_TOLERANCE = 1e-4


def dct_matrix(size: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``D`` (float64): ``D @ x`` is the spectrum of a signal ``x``."""
    index = torch.arange(size, dtype=torch.float64)
    basis = torch.cos(math.pi * (2 * index[None, :] + 1) * index[:, None] / (2 * size))
    scale = torch.full((size, 1), math.sqrt(2 / size), dtype=torch.float64)
    scale[0] = math.sqrt(1 / size)
    return basis * scale


def kept_frequencies(size: int, cutoff: float) -> int:
    """How many DCT frequencies along an axis of ``size`` pixels lie below ``cutoff * size``."""
    return min(size, max(1, math.ceil(cutoff * size - 1e-9)))


def low_pass_projector(size: int, cutoff: float) -> torch.Tensor:
    """The symmetric ``(size, size)`` matrix that keeps the frequencies below the cutoff."""
    basis = dct_matrix(size)[:kept_frequencies(size, cutoff)]
    return basis.T @ basis


def low_pass(pattern: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Projects ``(..., H, W)`` onto the low-pass DCT window, computed in float64."""
    rows = low_pass_projector(pattern.shape[-2], cutoff).to(pattern.device)
    cols = low_pass_projector(pattern.shape[-1], cutoff).to(pattern.device)
    return (rows @ pattern.double() @ cols).to(pattern.dtype)


def fit_to_ball(pattern: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Scales ``pattern`` down, if needed, so that its largest magnitude is at most ``epsilon``."""
    peak = float(pattern.abs().max())
    return pattern * (epsilon / peak) if peak > epsilon else pattern


@dataclass(eq=False)
class LowFrequency(Attack):
    """Adds one smooth pattern (low-pass DCT window, L-inf at most ``epsilon``) to every
    poisoned image; see the module docstring for the seeded and the crafted pattern."""

    name: ClassVar[str] = "low_frequency"
    epsilon: float = 0.2
    cutoff: float = 0.125
    pattern_seed: int = 0
    optimize: bool = False
    craft_images: int = 256
    craft_steps: int = 100
    craft_step_size: float = 0.01
    pattern: torch.Tensor | None = None

    def __post_init__(self):
        super().__post_init__()
        self.epsilon = require_float("epsilon", self.epsilon)
        self.cutoff = require_float("cutoff", self.cutoff)
        self.pattern_seed = require_int("pattern_seed", self.pattern_seed)
        self.craft_images = require_int("craft_images", self.craft_images)
        self.craft_steps = require_int("craft_steps", self.craft_steps)
        self.craft_step_size = require_float("craft_step_size", self.craft_step_size)
        if not isinstance(self.optimize, bool):
            raise RnpError(f"attack parameter optimize must be true or false, got {self.optimize!r}")
        if not 0 < self.epsilon <= 1:
            raise RnpError(f"LF epsilon (L-inf budget, [0, 1] scale) must lie in (0, 1], got {self.epsilon}")
        if not 0 < self.cutoff <= 1:
            raise RnpError(f"LF cutoff (share of DCT frequencies kept) must lie in (0, 1], got {self.cutoff}")
        if self.craft_images < 1 or self.craft_steps < 1 or not self.craft_step_size > 0:
            raise RnpError("LF craft_images, craft_steps and craft_step_size must be positive")
        if self.pattern is not None:
            self.pattern = self._checked_pattern(self.pattern)

    def _checked_pattern(self, pattern) -> torch.Tensor:
        pattern = torch.as_tensor(pattern, dtype=torch.float32).detach().cpu()
        if pattern.dim() != 3 or not torch.isfinite(pattern).all():
            raise RnpError("an LF pattern must be a finite (C, H, W) tensor")
        if float(pattern.abs().max()) > self.epsilon + 1e-6:
            raise RnpError(f"the LF pattern exceeds the L-inf budget epsilon={self.epsilon}")
        leak = (pattern.double() - low_pass(pattern.double(), self.cutoff)).abs().max()
        if float(leak) > SPECTRUM_TOLERANCE * max(self.epsilon, 1e-12):
            raise RnpError(f"the LF pattern has frequencies above the cutoff {self.cutoff}")
        return pattern

    @property
    def needs_reference_model(self) -> bool:
        """True while an optimised pattern is still to be crafted."""
        return self.optimize and self.pattern is None

    def seeded_pattern(self, shape) -> torch.Tensor:
        """The ``(C, H, W)`` pattern derived from ``pattern_seed``: low-passed uniform noise whose
        largest magnitude is exactly ``epsilon``."""
        channels, height, width = shape[-3:]
        generator = generator_for(self.pattern_seed, "low-frequency-pattern")
        noise = torch.rand(channels, height, width, generator=generator, dtype=torch.float64) * 2 - 1
        smooth = low_pass(noise, self.cutoff)
        return (smooth * (self.epsilon / smooth.abs().max())).float()

    def pattern_for(self, shape) -> torch.Tensor:
        """The pattern used on images of this shape: the crafted one, or the seeded one."""
        if self.pattern is None:
            if self.optimize:
                raise RnpError("LF with optimize=True needs prepare(train, reference_model) first")
            return self.seeded_pattern(shape)
        if tuple(self.pattern.shape) != tuple(shape[-3:]):
            raise RnpError(f"the crafted LF pattern has shape {tuple(self.pattern.shape)} but the "
                           f"images are {tuple(shape[-3:])}")
        return self.pattern

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise RnpError(f"LF expects images (N, C, H, W), got shape {tuple(images.shape)}")
        return (images + self.pattern_for(images.shape).to(images)).clamp(0, 1)

    def prepare(self, train: ImageSet, reference_model: nn.Module | None = None) -> None:
        """With ``optimize``, crafts the pattern on ``reference_model`` (once; a restored or already
        crafted pattern is kept). Without it there is nothing to fit."""
        if not self.needs_reference_model:
            return
        if reference_model is None:
            raise RnpError("LF with optimize=True needs a clean reference model to craft its trigger")
        self._check_target(train.num_classes)
        images, labels = self._crafting_set(train)
        self.pattern = self._craft(reference_model, images, labels)

    def _crafting_set(self, train: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded draw of ``craft_images`` training images (non-target ones for all-to-one)
        with the labels the attacker wants for them."""
        candidates = torch.arange(len(train))
        if self.mode == "all2one":
            candidates = candidates[train.labels != self.target]
        if len(candidates) == 0:
            raise RnpError("LF crafting needs training images outside the target class")
        order = torch.randperm(len(candidates), generator=generator_for(self.seed, "low-frequency-craft"))
        chosen = candidates[order[:self.craft_images]].sort().values
        return train.images[chosen], self.attack_labels(train.labels[chosen], train.num_classes)

    def _craft(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters(), torch.empty(0)).device
        pattern = self.seeded_pattern(images.shape).double().to(device)
        with eval_mode(model):
            for _ in range(self.craft_steps):
                step = self.craft_step_size * self._loss_gradient(model, images, labels, pattern).sign()
                pattern = fit_to_ball(low_pass(pattern - step, self.cutoff), self.epsilon)
        return pattern.float().cpu()

    def _loss_gradient(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       pattern: torch.Tensor) -> torch.Tensor:
        """Gradient of the mean cross-entropy toward ``labels`` with respect to the pattern."""
        device = pattern.device
        trigger = pattern.float().requires_grad_(True)
        total = torch.zeros_like(trigger)
        for start in range(0, len(images), CRAFT_BATCH):
            batch = images[start:start + CRAFT_BATCH].to(device).float() / 255
            target = labels[start:start + CRAFT_BATCH].to(device)
            loss = F.cross_entropy(model((batch + trigger).clamp(0, 1)), target, reduction="sum")
            total += torch.autograd.grad(loss, trigger)[0]
        return total.double() / len(images)
