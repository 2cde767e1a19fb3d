"""SIG: a clean-label backdoor carried by a faint horizontal sinusoid.

Barni, Kallas and Tondi, "A new backdoor attack in CNNs by training set corruption without label
poisoning", ICIP 2019 (arXiv 1902.11237). The attacker cannot relabel anything: it adds the signal
``v(i, j) = delta * sin(2 pi j f / m)`` (column ``j``, image width ``m``, 0-255 pixel scale) to
images that already belong to the target class, and the network learns to read the signal as
evidence for that class. At test time the same signal on an image of any other class pulls it
to the target.

Defaults: ``delta`` 20 and ``frequency`` 6 are the paper's sinusoidal-signal settings. The signal
is the same in every row and every channel and the result is clipped to the valid pixel range.
The paper studies training and test amplitudes separately; here one ``delta`` serves both, as
in the common re-implementations.

``poison_rate`` is a fraction of the whole training set, drawn only from the target class
(:meth:`~rnp.attacks.base.Attack.target_class_indices`). Defense evaluations on CIFAR-10
usually poison 80% of the target class, i.e. 8% of the training set, which is the default; the
largest possible rate is the target class's share (10% on CIFAR-10, where BackdoorBench poisons
the whole class), above which the base class raises.

SIG is all-to-one by construction (the signal's meaning comes from the class it was planted in),
so ``mode="all2all"`` is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from rnp.attacks.base import Attack, require_float
from rnp.data.images import ImageSet
from rnp.errors import RnpError


@dataclass(eq=False)
class SIG(Attack):
    """Adds a horizontal sinusoid of amplitude ``delta`` (0-255 scale) and ``frequency`` cycles
    per image width to target-class training images, labels unchanged (clean-label)."""

    name: ClassVar[str] = "sig"
    clean_label: ClassVar[bool] = True
    poison_rate: float = 0.08
    delta: float = 20.0
    frequency: float = 6.0

    def __post_init__(self):
        super().__post_init__()
        self.delta = require_float("delta", self.delta)
        self.frequency = require_float("frequency", self.frequency)
        if self.mode != "all2one":
            raise RnpError("SIG is a clean-label all-to-one attack; mode must be 'all2one'")
        if not 0 < self.delta <= 255:
            raise RnpError(f"SIG delta must lie in (0, 255] on the 0-255 pixel scale, got {self.delta}")
        if not 0 < self.frequency < math.inf:
            raise RnpError(f"SIG frequency must be a positive number, got {self.frequency}")

    def signal(self, width: int) -> torch.Tensor:
        """The ``(width,)`` row profile ``delta / 255 * sin(2 pi j f / width)`` on the [0, 1] scale."""
        columns = torch.arange(width, dtype=torch.float64)
        profile = self.delta / 255 * torch.sin(2 * math.pi * columns * self.frequency / width)
        return profile.float()

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise RnpError(f"SIG expects images (N, C, H, W), got shape {tuple(images.shape)}")
        return (images + self.signal(images.shape[-1]).to(images)).clamp(0, 1)

    def select_poison_indices(self, train: ImageSet) -> torch.Tensor:
        """Clean-label: ``poison_rate`` of the training set, drawn among target-class images."""
        return self.target_class_indices(train)
