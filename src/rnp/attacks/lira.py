"""LIRA: a learned, input-specific, imperceptible additive trigger, trained with the classifier.

Doan, Lao, Zhao and Li, "LIRA: Learnable, Imperceptible and Robust Backdoor Attacks", ICCV 2021.
A trigger generator T maps an image to a perturbation in [-1, 1] (tanh output) and the triggered
image is ``x' = clip(x + eps * T(x), 0, 1)``: every image gets its own trigger, and no pixel moves
by more than ``eps``. LIRA learns T together with the classifier f, in two stages:

- stage I (the first ``joint_fraction`` of the training epochs) alternates on every batch one
  step of T that lowers CE(f(x'), eta(y)) with f held fixed, and one step of f on
  ``alpha * CE(f(x), y) + (1 - alpha) * CE(f(x'), eta(y))``;
- stage II fixes T and keeps training f on the same objective.

Both stages run inside rnp's one training loop through :class:`LiraHook`. Nothing is poisoned
beforehand, so :meth:`Lira.poison` returns the training set unchanged with no poisoned indices:
every training image is seen both clean and triggered, inside the hook.

Defaults and their sources:

- ``eps = 0.01``: the paper's stealthiness bound for CIFAR-10, also the ``test_eps`` of the
  authors' released CIFAR-10 commands. Those commands train T at 0.1 in stage I and use it at
  0.01 from stage II on; here one ``eps`` serves both stages, so the T that is trained is the T
  that is evaluated. The authors add the perturbation to normalised images; rnp adds it in
  [0, 1] pixel space (0.01 is 2.55 grey levels, so the trigger survives 8-bit storage).
- ``alpha = 0.5``: the paper's loss weights (alpha = beta = 0.5), the authors' ``--alpha``.
- ``generator_lr = 1e-4``, Adam: T's optimiser and learning rate in the authors' code.
- ``joint_fraction = 50 / 550``: the authors' CIFAR-10 recipe runs 50 stage-I epochs, then
  fine-tunes for 500 stage-II epochs. At least one epoch is always stage I.
- ``generator_width = 64``: the CIFAR-10 generator is a U-Net with four levels of 64, 128, 256
  and 512 channels (two 3x3 conv + BatchNorm + ReLU per level, 2x2 max-pooling down, bilinear
  upsampling and skip connections up, a 1x1 conv and tanh out). :class:`TriggerUNet` is that
  shape with base width ``generator_width``; 8 or 16 keeps a CPU run affordable.

How the classifier's batch is built: the loop descends the plain mean cross-entropy of the batch
the hook returns. The hook returns the B clean images followed by triggered, relabelled copies of
m = round(B (1 - alpha) / alpha) of them (a seeded draw), so the mean weighs the clean part by
B / (B + m) = alpha and the triggered part by 1 - alpha. At alpha = 0.5 every image appears once
clean and once triggered: exactly the paper's objective, at the paper's cost of two images per
image. Differences from the authors' code: clean and triggered images share one BatchNorm batch
(the authors forward them separately); the classifier trains against T as it is after each
step, not against a copy refreshed once per epoch; the classifier's optimiser and schedule are
rnp's :class:`~rnp.training.TrainConfig` (the authors use SGD at lr 0.01). As in the authors'
code, T's step forwards through the classifier in train mode, so it also updates the
classifier's BatchNorm running statistics (never its parameters).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rnp.attacks.base import Attack, require_float, require_int
from rnp.data.images import ImageSet
from rnp.data.poisoned import PoisonedSet
from rnp.errors import RnpError
from rnp.training.hooks import TrainingHook
from rnp.utils import generator_for

PREFIX = "generator."
LEVELS = 4
_FIRST_CONV = "down.0.0.weight"


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(),
    )


class TriggerUNet(nn.Module):
    """LIRA's trigger generator: a four-level U-Net from images to a tanh map of the same shape.

    Level ``i`` has ``width * 2**i`` channels; the way up resizes to each skip's size, so images
    whose sides are not multiples of 8 work too (at least 8 pixels a side).
    """

    def __init__(self, channels: int, width: int):
        super().__init__()
        widths = [width * 2 ** i for i in range(LEVELS)]
        self.channels = channels
        self.down = nn.ModuleList(_double_conv(a, b) for a, b in zip([channels, *widths[:-1]], widths))
        self.up = nn.ModuleList(_double_conv(widths[i + 1] + widths[i], widths[i])
                                for i in reversed(range(LEVELS - 1)))
        self.out = nn.Conv2d(width, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < 2 ** (LEVELS - 1):
            raise RnpError(f"LIRA's U-Net needs images of at least {2 ** (LEVELS - 1)} pixels a side, "
                           f"got {tuple(x.shape[-2:])}")
        skips = []
        for level, block in enumerate(self.down):
            x = block(F.max_pool2d(x, 2) if level else x)
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return torch.tanh(self.out(x))


def build_generator(channels: int, width: int, seed: int) -> TriggerUNet:
    """A U-Net whose weights depend only on ``seed``; the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        net = TriggerUNet(channels, width)
    generator = generator_for(seed, "lira-generator")
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(module.weight[0].numel())
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)
    return net


@dataclass(eq=False)
class Lira(Attack):
    """Adds ``eps * T(x)`` for a U-Net T learned jointly with the classifier (see the module doc)."""

    name: ClassVar[str] = "lira"
    eps: float = 0.01
    alpha: float = 0.5
    generator_lr: float = 1e-4
    joint_fraction: float = 50 / 550
    generator_width: int = 64
    generator_seed: int = 0
    _generator: TriggerUNet | None = field(default=None, init=False, repr=False)
    _trained: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        for name in ("eps", "alpha", "generator_lr", "joint_fraction"):
            setattr(self, name, require_float(name, getattr(self, name)))
        self.generator_width = require_int("generator_width", self.generator_width)
        self.generator_seed = require_int("generator_seed", self.generator_seed)
        if not 0 < self.eps <= 1:
            raise RnpError(f"LIRA eps must lie in (0, 1], got {self.eps}")
        if not 0 < self.alpha < 1:
            raise RnpError(f"LIRA alpha (the clean loss weight) must lie in (0, 1), got {self.alpha}")
        if self.generator_lr <= 0:
            raise RnpError(f"LIRA generator_lr must be positive, got {self.generator_lr}")
        if not 0 < self.joint_fraction <= 1:
            raise RnpError(f"LIRA joint_fraction must lie in (0, 1], got {self.joint_fraction}")
        if self.generator_width < 1:
            raise RnpError(f"LIRA generator_width must be at least 1, got {self.generator_width}")

    def joint_epochs(self, epochs: int) -> int:
        """How many of ``epochs`` are stage I (T and classifier together): at least one."""
        return min(epochs, max(1, round(self.joint_fraction * epochs)))

    def generator(self, channels: int) -> TriggerUNet:
        """T for images with ``channels`` channels, built from ``generator_seed`` on first use."""
        if self._generator is None:
            self._generator = build_generator(channels, self.generator_width, self.generator_seed)
        elif self._generator.channels != channels:
            raise RnpError(f"the LIRA generator takes {self._generator.channels}-channel images, "
                           f"got {channels} channels")
        return self._generator

    def perturb(self, generator: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """``clip(x + eps * T(x), 0, 1)`` with the given T, in whatever mode and grad state it is."""
        return (images + self.eps * generator(images)).clamp(0, 1)

    def describe_poisoning(self) -> str:
        return f"every image, also triggered (alpha {self.alpha:g})"

    def apply_trigger(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        if not self._trained:
            raise RnpError("the LIRA trigger generator was never trained or loaded: train with "
                           "attack.training_hook(...) or load its artefacts first")
        generator = self.generator(images.shape[1]).eval()
        device = next(generator.parameters()).device
        with torch.no_grad():
            chunks = [self.perturb(generator, images[i:i + batch_size].to(device, torch.float32))
                      for i in range(0, len(images), batch_size)]
        return torch.cat(chunks).to(images) if chunks else images.clone()

    def poison(self, train: ImageSet) -> PoisonedSet:
        """The training set unchanged, with no poisoned indices: LIRA poisons inside its hook."""
        self._check_target(train.num_classes)
        return PoisonedSet(train, torch.empty(0, dtype=torch.long))

    def training_hook(self, num_classes: int) -> LiraHook:
        self._check_target(num_classes)
        return LiraHook(self, num_classes)

    def artifacts(self) -> dict[str, torch.Tensor]:
        """T's weights and BatchNorm statistics as ``generator.*``; empty while T is untrained."""
        if not self._trained:
            return {}
        return {PREFIX + k: v.detach().cpu().clone() for k, v in self._generator.state_dict().items()}

    def load_artifacts(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        unknown = sorted(k for k in tensors if not k.startswith(PREFIX))
        if unknown:
            raise RnpError(f"attack 'lira' has no artefact {', '.join(unknown)}")
        self.load_generator({k[len(PREFIX):]: v for k, v in tensors.items()})

    def load_generator(self, state: dict[str, torch.Tensor]) -> TriggerUNet:
        """Loads T's state dict (building T for its channel count) and marks T as trained."""
        if _FIRST_CONV not in state:
            raise RnpError(f"LIRA generator weights lack {_FIRST_CONV}; not a LIRA generator")
        generator = self.generator(state[_FIRST_CONV].shape[1])
        try:
            generator.load_state_dict(state)
        except RuntimeError:
            raise RnpError(f"the saved LIRA generator does not match a width-{self.generator_width} "
                           "generator; use the generator_width it was trained with") from None
        self._trained = True
        return generator

    def mark_trained(self) -> None:
        """Records that T has taken a training step, so :meth:`apply_trigger` may use it."""
        self._trained = True


class LiraHook(TrainingHook):
    """Runs LIRA inside the training loop: T's step (stage I only), then the clean + triggered batch.

    Its random choices (which images get triggered copies) come from its own seeded generator;
    :meth:`state_dict` carries T, T's Adam state and that generator through checkpoints.
    """

    def __init__(self, attack: Lira, num_classes: int):
        self.attack = attack
        self.num_classes = num_classes
        self.joint = True
        self.rng = generator_for(attack.seed, "lira-triggered-copies")
        self.optimizer: torch.optim.Optimizer | None = None

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.joint = epoch < self.attack.joint_epochs(epochs)

    def transform(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, None]:
        generator = self._generator_on(images)
        if self.joint:
            self._update_generator(generator, model, images, labels)
        index = self._copy_index(len(images)).to(images.device)
        generator.eval()
        with torch.no_grad():
            triggered = self.attack.perturb(generator, images[index])
        targets = self.attack.attack_labels(labels[index], self.num_classes)
        return torch.cat([images, triggered]), torch.cat([labels, targets]), None

    def _generator_on(self, images: torch.Tensor) -> TriggerUNet:
        """T on the batch's device, with its optimiser (whose state follows it there)."""
        generator = self.attack.generator(images.shape[1])
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(generator.parameters(), lr=self.attack.generator_lr)
        if next(generator.parameters()).device != images.device:
            generator.to(images.device)
            self.optimizer.load_state_dict(self.optimizer.state_dict())
        return generator

    def _update_generator(self, generator: TriggerUNet, model: nn.Module, images: torch.Tensor,
                          labels: torch.Tensor) -> None:
        """One Adam step of T on the classifier's loss toward the attack labels; f is not stepped."""
        generator.train()
        targets = self.attack.attack_labels(labels, self.num_classes)
        with _frozen(model):
            loss = F.cross_entropy(model(self.attack.perturb(generator, images)), targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        self.attack.mark_trained()

    def _copy_index(self, batch: int) -> torch.Tensor:
        """Which images get a triggered copy: m = round(B (1 - alpha) / alpha), at least one, drawn
        without repeats until every image has one (only alpha < 0.5 needs more than B copies)."""
        alpha = self.attack.alpha
        count = max(1, round(batch * (1 - alpha) / alpha))
        rounds = -(-count // batch)
        return torch.cat([torch.randperm(batch, generator=self.rng) for _ in range(rounds)])[:count]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"rng": self.rng.get_state()}
        if self.attack._generator is not None:
            state.update({PREFIX + k: v for k, v in self.attack._generator.state_dict().items()})
        if self.optimizer is not None:
            for index, slots in self.optimizer.state_dict()["state"].items():
                state.update({f"optimizer.{index}.{name}": value for name, value in slots.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "rng" not in state:
            raise RnpError("the checkpoint holds no LIRA state: it was written by a run without "
                           "this attack's training hook")
        self.rng.set_state(state["rng"])
        weights = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
        if weights:
            generator = self.attack.load_generator(weights)
            self.optimizer = torch.optim.Adam(generator.parameters(), lr=self.attack.generator_lr)
            self._load_optimizer_slots(state)

    def _load_optimizer_slots(self, state: dict[str, torch.Tensor]) -> None:
        packed = self.optimizer.state_dict()
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                slots.setdefault(int(index), {})[name] = value
        if set(slots) - set(packed["param_groups"][0]["params"]):
            raise RnpError("the checkpoint's LIRA optimiser state does not match the generator")
        packed["state"] = slots
        self.optimizer.load_state_dict(packed)


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Turns off the model's parameter gradients for the duration (T's step needs input grads only)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
