"""Adaptive-Blend: a blend trigger planted in random halves during poisoning, whole at test time.

Qi, Xie, Li, Mahloujifar and Mittal, "Revisiting the Assumption of Latent Separability for
Backdoor Defenses", ICLR 2023 (OpenReview _wSHsgrVali; earlier preprint "Circumventing Backdoor
Defenses That Are Based on Latent Separability", arXiv 2205.13613). The attack is built to defeat defenses that look
for poisoned samples as a separate cluster in the model's latent space, in two ways:

- asymmetric trigger planting: the blend trigger is cut into a grid of ``pieces`` equal pieces,
  and each poisoned training image gets a random subset of them (a fraction ``mask_rate`` of the
  pieces is left out) at a weak opacity ``train_alpha``; at test time the full trigger is blended
  at the stronger ``test_alpha``, which still fires the backdoor;
- conservatism (regularisation) samples: ``cover_rate`` of the training set gets the same kind of
  partial trigger but keeps its true label, so the backdoor is learnt only weakly and poisoned
  samples stay close to clean ones in latent space. They are the poisoned set's ``cover_indices``.

Defaults are the paper's CIFAR-10 settings: 16 pieces (a 4x4 grid) with half of them masked,
opacity 0.15 for training and 0.2 for testing, 0.3% payload samples (``poison_rate`` 0.003) and
0.3% conservatism samples (``cover_rate`` 0.003). The paper's trigger is a specific image (a
"Hello Kitty" picture); here the default pattern is uniform noise drawn from ``pattern_seed``,
exactly as :class:`~rnp.attacks.blend.Blend` draws it, and a user image can be given as
``pattern`` instead.

Choices beyond the paper: the pieces of an image whose size is not a multiple of the grid are as
equal as rounding allows (the paper's code requires an exact multiple); for all-to-one the
conservatism samples are drawn outside the target class, following the paper's description of
them as "correctly labeled to their semantic classes (other than the target class)" (a target-class
image with a partial trigger and its true label would be a payload sample). The paper evaluates
all-to-one only; all-to-all is supported since the construction does not depend on the target
(payload labels become ``(y + 1) mod K``, conservatism samples come from every class).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from rnp.attacks.base import Attack, require_float, require_int, seeded_draw
from rnp.attacks.blend import Blend
from rnp.data.images import ImageSet, to_uint8
from rnp.data.poisoned import PoisonedSet
from rnp.errors import RnpError
from rnp.utils import generator_for


@dataclass(eq=False)
class AdaptiveBlend(Attack):
    """Blends random trigger pieces into payload and conservatism samples, the full trigger at test time."""

    name: ClassVar[str] = "adaptive_blend"
    poison_rate: float = 0.003
    cover_rate: float = 0.003
    train_alpha: float = 0.15
    test_alpha: float = 0.2
    pieces: int = 16
    mask_rate: float = 0.5
    pattern_seed: int = 0
    pattern: torch.Tensor | None = None

    def __post_init__(self):
        super().__post_init__()
        self.cover_rate = require_float("cover_rate", self.cover_rate)
        self.train_alpha = require_float("train_alpha", self.train_alpha)
        self.test_alpha = require_float("test_alpha", self.test_alpha)
        self.pieces = require_int("pieces", self.pieces)
        self.mask_rate = require_float("mask_rate", self.mask_rate)
        self.pattern_seed = require_int("pattern_seed", self.pattern_seed)
        if not 0 <= self.cover_rate < 1:
            raise RnpError(f"cover rate must lie in [0, 1), got {self.cover_rate}")
        for name in ("train_alpha", "test_alpha"):
            if not 0 < getattr(self, name) <= 1:
                raise RnpError(f"Adaptive-Blend {name} must lie in (0, 1], got {getattr(self, name)}")
        if self.pieces < 1 or math.isqrt(self.pieces) ** 2 != self.pieces:
            raise RnpError(f"Adaptive-Blend pieces must be a square number (4, 9, 16, ...), got {self.pieces}")
        if not 0 <= self.mask_rate < 1 or self.kept_pieces < 1:
            raise RnpError(f"mask rate {self.mask_rate} must leave at least one of {self.pieces} pieces")
        self.pattern = self._blend().pattern

    @property
    def kept_pieces(self) -> int:
        """How many trigger pieces a poisoned training image carries."""
        return self.pieces - round(self.mask_rate * self.pieces)

    def _blend(self) -> Blend:
        return Blend(alpha=self.test_alpha, pattern_seed=self.pattern_seed, pattern=self.pattern)

    def pattern_for(self, shape: torch.Size) -> torch.Tensor:
        """The ``(C, H, W)`` trigger for images of this shape (the same as Blend's for these fields)."""
        return self._blend().pattern_for(shape)

    def describe_poisoning(self) -> str:
        return f"{100 * self.poison_rate:g}% (+{100 * self.cover_rate:g}% conservatism)"

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        """The test-time trigger: the whole pattern blended at ``test_alpha``."""
        pattern = self.pattern_for(images.shape).to(images)
        return (1 - self.test_alpha) * images + self.test_alpha * pattern

    def piece_masks(self, height: int, width: int) -> torch.Tensor:
        """``(pieces, H, W)`` booleans: the pixels of each piece, numbered row by row."""
        side = math.isqrt(self.pieces)
        if side > min(height, width):
            raise RnpError(f"a {height}x{width} image cannot be cut into {side}x{side} trigger pieces")
        rows = torch.arange(height) * side // height
        cols = torch.arange(width) * side // width
        cell = rows[:, None] * side + cols[None, :]
        return cell[None] == torch.arange(self.pieces)[:, None, None]

    def choose_pieces(self, count: int) -> torch.Tensor:
        """``(count, pieces)`` booleans: the seeded random pieces each poisoned image carries."""
        generator = generator_for(self.seed, "adaptive-blend-pieces")
        chosen = torch.zeros(count, self.pieces, dtype=torch.bool)
        for row in chosen:
            row[torch.randperm(self.pieces, generator=generator)[:self.kept_pieces]] = True
        return chosen

    def partial_trigger_uint8(self, images: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The training trigger: the ``chosen`` pieces ``(N, pieces)`` blended at ``train_alpha``."""
        float_images = images.float() / 255
        pattern = self.pattern_for(images.shape)
        masks = self.piece_masks(*images.shape[-2:])
        weight = self.train_alpha * (chosen.float() @ masks.flatten(1).float()).view(len(images), 1,
                                                                                      *images.shape[-2:])
        return to_uint8(float_images + weight * (pattern - float_images))

    def select_cover_indices(self, train: ImageSet, payload: torch.Tensor) -> torch.Tensor:
        """A seeded draw of ``cover_rate`` of the training set among the images not poisoned (and,
        for all-to-one, not in the target class)."""
        if self.cover_rate == 0:
            return torch.empty(0, dtype=torch.long)
        count = max(1, round(self.cover_rate * len(train)))
        free = torch.ones(len(train), dtype=torch.bool)
        free[payload] = False
        if self.mode == "all2one":
            free &= train.labels != self.target
        candidates = free.nonzero().squeeze(1)
        if count > len(candidates):
            raise RnpError(f"cover rate {self.cover_rate} asks for {count} conservatism samples but only "
                           f"{len(candidates)} images are free")
        return seeded_draw(candidates, count, generator_for(self.seed, "adaptive-blend-cover"))

    def poison(self, train: ImageSet) -> PoisonedSet:
        """Partial triggers on payload (relabelled) and conservatism (label kept) samples."""
        self._check_target(train.num_classes)
        payload = self.select_poison_indices(train)
        cover = self.select_cover_indices(train, payload)
        both = torch.cat([payload, cover])
        images, labels = train.images.clone(), train.labels.clone()
        images[both] = self.partial_trigger_uint8(train.images[both], self.choose_pieces(len(both)))
        labels[payload] = self.attack_labels(train.labels[payload], train.num_classes)
        return PoisonedSet(train.with_images(images, labels), payload, cover)
