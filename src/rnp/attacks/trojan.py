"""Trojan (TrojanNN): a square trigger stamped on the image, optionally optimised on a clean model.

Liu, Ma, Aafer, Lee, Zhai, Wang and Zhang, "Trojaning Attack on Neural Networks", NDSS 2018.
The paper inverts a trained network to build its trigger: it picks internal neurons that are
strongly connected to their neighbouring layer and changes the pixels inside a fixed trigger
mask by gradient descent until those neurons reach a high target value; the triggered images
are then relabelled to the target. Here the trigger is stamped into a poisoned training set
(as in the RNP evaluation) rather than used to retrain a published model.

Defaults and their sources:

- mask: a square in the bottom-right corner covering about 7% of the image (side
  ``round(sqrt(0.07 H W))``, 8 pixels on 32x32); the paper evaluates square masks of 4%, 7% and
  10% of the input and we take the middle one. The trigger replaces the pixels it covers (the
  paper's 0% transparency). The RNP code's CIFAR trigger is a 3x3 square added at rows/cols
  25-27; ``size=3, location=(25, 25)`` stamps one at the same place.
- pattern before optimisation: uniform noise inside the mask drawn from ``pattern_seed``.
- ``optimize=True`` (the paper's trigger generation): the layer is the input of the model's last
  ``nn.Linear`` (the penultimate features), or of the ``nn.Linear`` named ``layer``; the
  ``neurons`` (default 1) features with the largest summed absolute weight into that Linear are
  driven toward ``target_value`` = 100 by minimising ``(target_value - activation)^2``.
  Deviations: the paper ranks neurons by their weights to the *preceding* layer, which is not
  defined for an arbitrary module feeding a Linear, so we rank by the outgoing weights, which
  every architecture has; the paper descends plain gradients on one input, we use Adam
  (``lr`` 0.05, ``steps`` 200; plain gradients depend on the network's scale) on the trigger
  stamped on 64 seeded training images, so it excites the neurons whatever image carries it.
- ``poison_rate`` 0.1, the base default, as in the RNP evaluation.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from rnp.attacks.base import Attack, require_float, require_int
from rnp.data.images import ImageSet
from rnp.errors import RnpError
from rnp.models.probes import capture_activations
from rnp.utils import generator_for

AREA = 0.07
OPTIMISATION_IMAGES = 64


@contextlib.contextmanager
def frozen_reference(model: nn.Module):
    """Runs a reference model in eval mode with gradients off for its parameters, and yields the
    device it lives on; every module's mode and every parameter's flag are restored afterwards,
    so the caller's model is left exactly as it was given."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.eval()
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield next(model.parameters(), torch.empty(0)).device
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def captured_inputs(layer: nn.Linear):
    """A dict whose ``"features"`` holds ``(N, in_features)`` inputs of ``layer`` from the latest
    forward pass (averaged over any extra leading axes); the hook is removed on exit."""
    store: dict[str, torch.Tensor] = {}

    def record(name: str, inputs: torch.Tensor) -> None:
        store[name] = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1]).mean(1)

    with capture_activations({"features": layer}, record, inputs=True):
        yield store


@dataclass(eq=False)
class Trojan(Attack):
    """Stamps a square trigger (seeded noise, or the optimised ``pattern``) on poisoned images.

    ``size`` is the side of the square in pixels (``None``: about 7% of the image area),
    ``location`` its top-left (row, col) (``None``: bottom-right corner). ``pattern`` is a full
    ``(C, H, W)`` image in [0, 1] whose mask region is the trigger, set by :meth:`prepare` when
    ``optimize`` and saved as an artefact.
    """

    name: ClassVar[str] = "trojan"
    size: int | None = None
    location: tuple[int, int] | None = None
    pattern_seed: int = 0
    optimize: bool = False
    layer: str | None = None
    neurons: int = 1
    target_value: float = 100.0
    steps: int = 200
    lr: float = 0.05
    pattern: torch.Tensor | None = None

    def __post_init__(self):
        super().__post_init__()
        self.pattern_seed = require_int("pattern_seed", self.pattern_seed)
        self.neurons = require_int("neurons", self.neurons)
        self.steps = require_int("steps", self.steps)
        self.target_value = require_float("target_value", self.target_value)
        self.lr = require_float("lr", self.lr)
        if self.size is not None:
            self.size = require_int("size", self.size)
            if self.size < 1:
                raise RnpError(f"Trojan trigger size must be at least 1, got {self.size}")
        if self.location is not None:
            if not isinstance(self.location, (tuple, list)) or len(self.location) != 2:
                raise RnpError(f"Trojan trigger location must be (row, col), got {self.location!r}")
            self.location = tuple(require_int("location", v) for v in self.location)
        if not isinstance(self.optimize, bool):
            raise RnpError(f"attack parameter optimize must be true or false, got {self.optimize!r}")
        if self.layer is not None and not isinstance(self.layer, str):
            raise RnpError(f"attack parameter layer must be a module name, got {self.layer!r}")
        if self.neurons < 1 or self.steps < 1 or self.lr <= 0 or self.target_value <= 0:
            raise RnpError("Trojan neurons and steps must be at least 1, lr and target_value positive")
        if self.pattern is not None:
            self.pattern = torch.as_tensor(self.pattern, dtype=torch.float32)
            if self.pattern.dim() != 3 or self.pattern.min() < 0 or self.pattern.max() > 1:
                raise RnpError("a Trojan pattern must be a (C, H, W) image with values in [0, 1]")

    @property
    def needs_reference_model(self) -> bool:
        return self.optimize

    def trigger_region(self, height: int, width: int) -> tuple[slice, slice]:
        """Rows and columns the trigger mask covers in an image of the given size."""
        side = self.size if self.size is not None else max(1, round(math.sqrt(AREA * height * width)))
        if side > min(height, width):
            raise RnpError(f"a {side}-pixel Trojan trigger does not fit a {height}x{width} image")
        top, left = self.location if self.location is not None else (height - side, width - side)
        if not (0 <= top <= height - side and 0 <= left <= width - side):
            raise RnpError(f"a {side}-pixel Trojan trigger at {self.location} does not fit "
                           f"a {height}x{width} image")
        return slice(top, top + side), slice(left, left + side)

    def default_pattern(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The un-optimised trigger: seeded uniform noise inside the mask, zero elsewhere."""
        rows, cols = self.trigger_region(height, width)
        side = rows.stop - rows.start
        pattern = torch.zeros(channels, height, width)
        generator = generator_for(self.pattern_seed, "trojan-pattern")
        pattern[:, rows, cols] = torch.rand(channels, side, side, generator=generator)
        return pattern

    def pattern_for(self, shape: torch.Size) -> torch.Tensor:
        """The ``(C, H, W)`` trigger image for images of this shape."""
        channels, height, width = shape[-3:]
        if self.pattern is None:
            return self.default_pattern(channels, height, width)
        if tuple(self.pattern.shape) != (channels, height, width):
            raise RnpError(f"the Trojan pattern is {tuple(self.pattern.shape)} but the images are "
                           f"{(channels, height, width)}")
        return self.pattern

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        rows, cols = self.trigger_region(*images.shape[-2:])
        out = images.clone()
        out[..., rows, cols] = self.pattern_for(images.shape)[:, rows, cols].to(out)
        return out

    def select_neurons(self, model: nn.Module) -> tuple[nn.Linear, torch.Tensor]:
        """The Linear whose input is the chosen layer, and the sorted indices of the input
        features with the largest summed absolute outgoing weight."""
        if self.layer is None:
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise RnpError("the reference model has no nn.Linear layer to take Trojan neurons from")
            linear = linears[-1]
        else:
            linear = dict(model.named_modules()).get(self.layer)
            if not isinstance(linear, nn.Linear):
                raise RnpError(f"Trojan layer {self.layer!r} is not an nn.Linear of the reference model")
        if self.neurons > linear.in_features:
            raise RnpError(f"asked for {self.neurons} Trojan neurons but the layer has "
                           f"{linear.in_features} features")
        strength = linear.weight.detach().abs().sum(0)
        return linear, strength.topk(self.neurons).indices.sort().values

    def prepare(self, train: ImageSet, reference_model: nn.Module | None = None) -> None:
        """With ``optimize``, replaces ``pattern`` by the trigger optimised on ``reference_model``."""
        if not self.optimize:
            return
        if reference_model is None:
            raise RnpError("the optimised Trojan trigger needs a clean reference model; "
                           "pass reference_model to prepare")
        start = self.default_pattern(*train.image_shape)
        self.pattern = self._optimise(reference_model, self._optimisation_images(train), start)

    def _optimisation_images(self, train: ImageSet) -> torch.Tensor:
        count = min(OPTIMISATION_IMAGES, len(train))
        generator = generator_for(self.pattern_seed, "trojan-optimisation-images")
        index = torch.randperm(len(train), generator=generator)[:count]
        return train.images[index].float() / 255

    def _optimise(self, model: nn.Module, images: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        rows, cols = self.trigger_region(*images.shape[-2:])
        with frozen_reference(model) as device:
            linear, neurons = self.select_neurons(model)
            images = images.to(device)
            patch = start[:, rows, cols].clone().to(device).requires_grad_(True)
            optimiser = torch.optim.Adam([patch], lr=self.lr)
            with captured_inputs(linear) as store:
                for _ in range(self.steps):
                    stamped = images.clone()
                    stamped[..., rows, cols] = patch
                    model(stamped)
                    loss = (self.target_value - store["features"][:, neurons]).pow(2).mean()
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    with torch.no_grad():
                        patch.clamp_(0, 1)
        pattern = torch.zeros_like(start)
        pattern[:, rows, cols] = patch.detach().cpu()
        return pattern
