"""BppAttack: the trigger is a reduction of every channel's colour depth, with dithering.

Wang, Zhai and Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural Networks
via Image Quantization and Contrastive Adversarial Learning", CVPR 2022 (arXiv 2205.13383).

Trigger: each channel is requantised to ``squeeze_num`` evenly spaced levels in [0, 1]. With
``dithering`` the rounding error is spread to the unprocessed neighbours by Floyd-Steinberg error
diffusion (7/16 right, 3/16 below-left, 5/16 below, 1/16 below-right, raster order), so the local
mean colour survives and the change is hard to see. A pixel whose accumulated value leaves [0, 1]
takes the nearest level (0 or the top one), as error diffusion over a palette does; the released
code leaves such values unclipped. The dithering is deterministic and vectorised over images and
channels; only the raster scan over pixels is a Python loop, as error diffusion is sequential.

Contrastive adversarial learning: the paper makes "negative" samples with adversarial attacks on
the model being trained and keeps their true labels, so that the network learns that only the exact
quantisation, not any small perturbation, triggers the backdoor. They depend on the current
classifier, so they are made by :class:`BppNegativeHook` during training: per batch it draws
``round(neg_ratio * batch)`` images (for all-to-one, among those not labelled ``target``, which
leaves the poisoned ones alone), runs ``pgd_steps`` steps of L-infinity PGD towards the attacker's
label for each (step 2.5 ``pgd_eps`` / ``pgd_steps``, Madry et al.'s rule, from a seeded uniform
start) on the model in eval mode, and puts the results in the batch with their labels unchanged.
Cost: ``pgd_steps`` forward and backward passes on ``neg_ratio`` of each batch, about 0.6 extra
batch passes per step with the defaults. The authors' released code uses a cheaper variant without
the classifier (the quantisation residual of another training image added to the image); we follow
the paper's description.

Defaults: ``squeeze_num`` 8 (3 bits per channel) and ``neg_ratio`` 0.2 are the CIFAR-10 values of
the authors' released configuration; ``poison_rate`` 0.2 is its ``injection_rate`` (there a share
of each batch, here a fixed 20% of the training set). ``dithering`` is on, as in the paper's
trigger. The PGD budget is not specified there; ``pgd_eps`` ``None`` means half a quantisation
step, 1 / (2 (``squeeze_num`` - 1)), the largest change plain requantisation makes, so negatives
are perturbations as large as the trigger; ``pgd_steps`` 3 keeps the per-batch cost small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rnp.attacks.base import Attack, require_float, require_int
from rnp.errors import RnpError
from rnp.models.probes import eval_mode
from rnp.training.hooks import TrainingHook
from rnp.utils import generator_for

# Floyd-Steinberg weights: right, below-left, below, below-right.
RIGHT, BELOW_LEFT, BELOW, BELOW_RIGHT = 7 / 16, 3 / 16, 5 / 16, 1 / 16


@dataclass(eq=False)
class Bpp(Attack):
    """Requantises images to ``squeeze_num`` levels per channel (dithered); trains with PGD negatives."""

    name: ClassVar[str] = "bpp"
    poison_rate: float = 0.2
    squeeze_num: int = 8
    dithering: bool = True
    neg_ratio: float = 0.2
    pgd_steps: int = 3
    pgd_eps: float | None = None

    def __post_init__(self):
        super().__post_init__()
        self.squeeze_num = require_int("squeeze_num", self.squeeze_num)
        self.neg_ratio = require_float("neg_ratio", self.neg_ratio)
        self.pgd_steps = require_int("pgd_steps", self.pgd_steps)
        if not 2 <= self.squeeze_num <= 255:
            raise RnpError(f"BppAttack squeeze_num must lie in [2, 255] levels, got {self.squeeze_num}")
        if not isinstance(self.dithering, bool):
            raise RnpError(f"BppAttack dithering must be true or false, got {self.dithering!r}")
        if not 0 <= self.neg_ratio < 1:
            raise RnpError(f"BppAttack neg_ratio must lie in [0, 1), got {self.neg_ratio}")
        if self.pgd_steps < 1:
            raise RnpError(f"BppAttack pgd_steps must be at least 1, got {self.pgd_steps}")
        if self.pgd_eps is not None:
            self.pgd_eps = require_float("pgd_eps", self.pgd_eps)
            if not 0 < self.pgd_eps <= 1:
                raise RnpError(f"BppAttack pgd_eps must lie in (0, 1], got {self.pgd_eps}")

    @property
    def epsilon(self) -> float:
        """The L-infinity budget of the negatives: ``pgd_eps`` or half a quantisation step."""
        return self.pgd_eps if self.pgd_eps is not None else 0.5 / (self.squeeze_num - 1)

    def describe_poisoning(self) -> str:
        return f"{100 * self.poison_rate:g}% (+{100 * self.neg_ratio:g}% negatives per batch)"

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise RnpError(f"BppAttack needs images (N, C, H, W), got shape {tuple(images.shape)}")
        if self.dithering:
            return floyd_steinberg(images, self.squeeze_num)
        steps = self.squeeze_num - 1
        return (images * steps).round().clamp(0, steps) / steps

    def training_hook(self, num_classes: int) -> TrainingHook | None:
        """The hook that swaps PGD negatives into each batch, or None when ``neg_ratio`` is 0."""
        if self.neg_ratio == 0:
            return None
        self._check_target(num_classes)
        return BppNegativeHook(self, num_classes)


def floyd_steinberg(images: torch.Tensor, levels: int) -> torch.Tensor:
    """Floyd-Steinberg dithering of ``(N, C, H, W)`` images in [0, 1] to ``levels`` values per channel.

    Works in units of one level (float64, so the result does not depend on the batch); every image
    and channel is one column of a ``(H, W, N * C)`` array, so each pixel step is one vector operation.
    """
    n, c, h, w = images.shape
    steps = levels - 1
    work = (images.detach().to(torch.float64) * steps).permute(2, 3, 0, 1).reshape(h, w, n * c)
    work = work.contiguous()
    for y in range(h):
        for x in range(w):
            old = work[y, x].clone()
            new = old.round().clamp(0, steps)
            work[y, x] = new
            error = old - new
            if x + 1 < w:
                work[y, x + 1] += error * RIGHT
            if y + 1 < h:
                if x > 0:
                    work[y + 1, x - 1] += error * BELOW_LEFT
                work[y + 1, x] += error * BELOW
                if x + 1 < w:
                    work[y + 1, x + 1] += error * BELOW_RIGHT
    out = (work / steps).reshape(h, w, n, c).permute(2, 3, 0, 1)
    return out.to(images.dtype).contiguous()


def pgd_towards(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, eps: float, steps: int,
                generator: torch.Generator) -> torch.Tensor:
    """Targeted L-infinity PGD: images within ``eps`` of ``images`` that ``model`` sees as ``targets``.

    Starts from a uniform draw in the ``eps`` ball (from ``generator``) and runs in eval mode, so
    batch-norm statistics are not updated; gradients go to the images only, never the parameters.
    """
    start = torch.rand(images.shape, generator=generator).to(images) * 2 - 1
    adversarial = (images + eps * start).clamp(0, 1)
    step_size = 2.5 * eps / steps
    with eval_mode(model), torch.enable_grad():
        for _ in range(steps):
            adversarial.requires_grad_(True)
            loss = F.cross_entropy(model(adversarial), targets)
            (grad,) = torch.autograd.grad(loss, adversarial)
            moved = adversarial.detach() - step_size * grad.sign()
            adversarial = torch.min(torch.max(moved, images - eps), images + eps).clamp(0, 1)
    return adversarial.detach()


class BppNegativeHook(TrainingHook):
    """Replaces a seeded ``neg_ratio`` share of each batch by PGD negatives that keep their labels.

    The draw of images and PGD starts comes from this hook's own generator (salted from the
    attack's ``seed``), whose state travels through :meth:`state_dict` so a resumed run repeats.
    """

    def __init__(self, attack: Bpp, num_classes: int):
        self.attack = attack
        self.num_classes = num_classes
        self.generator = generator_for(attack.seed, "bpp-negatives")

    def choose(self, labels: torch.Tensor) -> torch.Tensor:
        """Batch positions to turn into negatives (for all-to-one, never target-labelled ones)."""
        labels = labels.cpu()
        candidates = torch.arange(len(labels))
        if self.attack.mode == "all2one":
            candidates = candidates[labels != self.attack.target]
        count = min(round(self.attack.neg_ratio * len(labels)), len(candidates))
        order = torch.randperm(len(candidates), generator=self.generator)
        return candidates[order[:count]].sort().values

    def transform(self, model, images, labels):
        index = self.choose(labels).to(images.device)
        if len(index) == 0:
            return images, labels, None
        targets = self.attack.attack_labels(labels[index], self.num_classes)
        out = images.clone()
        out[index] = pgd_towards(model, images[index], targets, self.attack.epsilon,
                                 self.attack.pgd_steps, self.generator)
        return out, labels, None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "generator" not in state:
            raise RnpError("the BppAttack hook state has no generator state")
        self.generator.set_state(state["generator"].to(torch.uint8).cpu())
