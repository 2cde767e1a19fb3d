"""Input-Aware Dynamic backdoor (IAD): every image gets its own trigger, made by a generator.

Nguyen and Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020 (arXiv 2010.08138). A
pattern generator G and a mask generator M, two small encoder-decoder networks, turn an image
``x`` into ``x' = x + (G(x) - x) * M(x)``. M's output is pushed towards 0 or 1 by the paper's
soft threshold ``tanh(20 m - 10) / 2 + 1/2``, used in both phases and at test time so that the
classifier learns the very triggers it is tested on.

Training has two phases, as in the paper:

1. :meth:`InputAware.prepare` trains M alone for ``mask_epochs`` on the clean training images
   with the mask-density loss ``mean(relu(M(x) - mask_density))`` (weight ``lambda_norm``) and
   the diversity loss ``||x1 - x2|| / ||M(x1) - M(x2)||`` over pairs of images (weight
   ``lambda_div``), so that different images get different masks.
2. :meth:`InputAware.training_hook` trains G jointly with the classifier: in each batch a
   ``poison_rate`` share (the paper's p_attack) is triggered and relabelled, a ``cross_rate``
   share (p_cross) gets the pattern and mask of *another* image of the batch and keeps its
   label, so a trigger does not transfer between images, and the rest stays clean. G descends
   the classifier's cross-entropy plus ``lambda_div`` times its diversity loss; M is frozen.

Because poisoning happens batch by batch, :meth:`InputAware.poison` returns the training set
unchanged with no poisoned indices. Nothing of the training set is stored poisoned.

Defaults are the paper's CIFAR-10 settings as published with its code: p_attack 0.1, p_cross
0.1, lambda_div 1, lambda_norm 100, mask density 0.032, 25 mask epochs, Adam with lr 0.01 and
betas (0.5, 0.9) for both generators, mask batch 128, generator base width 32 (channels 32, 64,
128 over three down- and up-sampling steps), epsilon 1e-7 in the diversity ratio. The paper
decays M's lr by 0.1 after epochs 10 and 20 of 25 and G's after epochs 200, 300, 400 and 500 of
600 (``lr_gamma`` 0.1 for both); here the milestones are fractions of the run (0.4, 0.8 and 1/3,
1/2, 2/3, 5/6) so the schedule keeps its shape in runs of any length. Backdoor and cross counts
per batch are floored as in the paper (12 and 12 of 128). The classifier's optimiser is the
trainer's (the paper's is SGD, lr 0.01, over 600 epochs).

Deviations: images stay in [0, 1] pixel space (the paper mixes normalised images and patterns,
which is the same affine blend); the cross-trigger and diversity partners are other images of
the same batch, not a second data loader; distances in the diversity ratio are floored at
epsilon so that identical outputs give a zero rather than a NaN gradient; images whose sides
are not multiples of 8 are edge-padded for the generators and cropped back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rnp.attacks.base import Attack, require_float, require_int
from rnp.data.images import ImageSet
from rnp.data.loader import iterate_batches
from rnp.data.poisoned import PoisonedSet
from rnp.errors import RnpError
from rnp.training.hooks import TrainingHook
from rnp.utils import derive_seed, generator_for

EPSILON = 1e-7
DEPTH = 3  # down- and up-sampling steps of the paper's CIFAR-10 generators
TRIGGER_BATCH = 256
PATTERN_PREFIX = "pattern_generator."
MASK_PREFIX = "mask_generator."
FIRST_CONV = "layers.0.0.weight"


def _conv_block(in_channels: int, out_channels: int, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class TriggerNet(nn.Module):
    """The encoder-decoder of both generators; outputs lie in (0, 1).

    The encoder has ``DEPTH`` steps of two 3x3 conv-BN-ReLU blocks and a 2x2 max-pool, doubling
    the channels from ``width``; a middle block follows; the decoder mirrors it with nearest
    upsampling, ending in a conv-BN block with ``out_channels`` and a squashed tanh.
    """

    def __init__(self, in_channels: int, out_channels: int, width: int):
        super().__init__()
        layers, channels = [], in_channels
        for step in range(DEPTH):
            wide = width * 2 ** step
            layers += [_conv_block(channels, wide), _conv_block(wide, wide), nn.MaxPool2d(2)]
            channels = wide
        layers.append(_conv_block(channels, channels))
        for step in range(DEPTH):
            last = step == DEPTH - 1
            narrow = out_channels if last else channels // 2
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv_block(channels, channels),
                       _conv_block(channels, narrow, relu=not last)]
            channels = narrow
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        multiple = 2 ** DEPTH
        padded = F.pad(images, (0, -width % multiple, 0, -height % multiple), mode="replicate")
        out = self.layers(padded)[..., :height, :width]
        return torch.tanh(out) / (2 + EPSILON) + 0.5


def soft_threshold(masks: torch.Tensor) -> torch.Tensor:
    """The paper's near-binary squashing of mask values around 0.5."""
    return torch.tanh(masks * 20 - 10) / (2 + EPSILON) + 0.5


def diversity_loss(inputs_a: torch.Tensor, inputs_b: torch.Tensor, outputs_a: torch.Tensor,
                   outputs_b: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of ``rms(inputs_a - inputs_b) / rms(outputs_a - outputs_b)``: small when
    different inputs get outputs at least as different as they are."""
    def distance(a, b):
        return (a - b).pow(2).flatten(1).mean(1).clamp_min(EPSILON ** 2).sqrt()
    return (distance(inputs_a, inputs_b) / (distance(outputs_a, outputs_b) + EPSILON)).mean()


def _decay(epoch: int, epochs: int, milestones: tuple[float, ...], gamma: float) -> float:
    """The step-decay factor for ``epoch`` of ``epochs`` with milestones as fractions of the run."""
    return gamma ** sum(epoch + 1e-9 >= m * epochs for m in milestones)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _with_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone() for k, v in tensors.items()}


def _strip_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _fractions(name: str, values) -> tuple[float, ...]:
    if not isinstance(values, (tuple, list)):
        raise RnpError(f"attack parameter {name} must be a list of fractions, got {values!r}")
    values = tuple(require_float(name, v) for v in values)
    if any(not 0 < v <= 1 for v in values):
        raise RnpError(f"attack parameter {name} must hold fractions of the run in (0, 1], got {values}")
    return values


@dataclass(eq=False)
class InputAware(Attack):
    """Input-Aware Dynamic attack; ``poison_rate`` is the paper's p_attack (share of each batch).

    ``generator_width`` is the generators' base channel count (32 as in the paper; 8 trains
    fast on a CPU); both are initialised from ``generator_seed``. The ``mask_*`` fields drive
    the mask pre-training of :meth:`prepare`, the ``generator_*`` fields G's optimiser.
    """

    name: ClassVar[str] = "input_aware"
    cross_rate: float = 0.1
    lambda_div: float = 1.0
    lambda_norm: float = 100.0
    mask_density: float = 0.032
    mask_epochs: int = 25
    mask_batch_size: int = 128
    mask_lr: float = 0.01
    mask_milestones: tuple[float, ...] = (0.4, 0.8)
    generator_lr: float = 0.01
    generator_milestones: tuple[float, ...] = (1 / 3, 1 / 2, 2 / 3, 5 / 6)
    lr_gamma: float = 0.1
    adam_betas: tuple[float, float] = (0.5, 0.9)
    generator_width: int = 32
    generator_seed: int = 0
    _pattern_net: TriggerNet | None = field(default=None, init=False, repr=False)
    _mask_net: TriggerNet | None = field(default=None, init=False, repr=False)
    _mask_trained: bool = field(default=False, init=False, repr=False)
    _pattern_trained: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        for name in ("cross_rate", "lambda_div", "lambda_norm", "mask_density", "mask_lr",
                     "generator_lr", "lr_gamma"):
            setattr(self, name, require_float(name, getattr(self, name)))
        for name in ("mask_epochs", "mask_batch_size", "generator_width", "generator_seed"):
            setattr(self, name, require_int(name, getattr(self, name)))
        self.mask_milestones = _fractions("mask_milestones", self.mask_milestones)
        self.generator_milestones = _fractions("generator_milestones", self.generator_milestones)
        self._check_ranges()

    def _check_ranges(self) -> None:
        if not 0 <= self.cross_rate < 1 or self.poison_rate + self.cross_rate > 1:
            raise RnpError(f"cross rate must lie in [0, 1) with poison rate + cross rate <= 1, "
                           f"got {self.cross_rate} and {self.poison_rate}")
        if not 0 < self.mask_density < 1:
            raise RnpError(f"mask density must lie in (0, 1), got {self.mask_density}")
        if self.lambda_div < 0 or self.lambda_norm < 0:
            raise RnpError("lambda_div and lambda_norm must not be negative")
        if self.mask_lr <= 0 or self.generator_lr <= 0 or not 0 < self.lr_gamma <= 1:
            raise RnpError("learning rates must be positive and lr_gamma must lie in (0, 1]")
        if min(self.mask_epochs, self.mask_batch_size, self.generator_width) < 1:
            raise RnpError("mask_epochs, mask_batch_size and generator_width must be at least 1")
        betas = self.adam_betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise RnpError(f"adam_betas must be a pair of numbers, got {betas!r}")
        self.adam_betas = tuple(require_float("adam_betas", b) for b in betas)
        if any(not 0 <= b < 1 for b in self.adam_betas):
            raise RnpError(f"adam_betas must lie in [0, 1), got {self.adam_betas}")

    # --- generators ---------------------------------------------------------------------------

    def build_generators(self, in_channels: int) -> None:
        """Fresh G and M for images with ``in_channels`` channels, initialised from
        ``generator_seed`` without touching the global random state."""
        self._pattern_net = self._seeded_net(in_channels, in_channels, "iad-pattern-init")
        self._mask_net = self._seeded_net(in_channels, 1, "iad-mask-init")
        self._mask_trained = self._pattern_trained = False

    def _seeded_net(self, in_channels: int, out_channels: int, purpose: str) -> TriggerNet:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.generator_seed, purpose))
            return TriggerNet(in_channels, out_channels, self.generator_width)

    def _nets(self) -> tuple[TriggerNet, TriggerNet]:
        if self._pattern_net is None or self._mask_net is None:
            raise RnpError("the input_aware attack has no generators yet: call prepare() on the "
                           "training set or load its artefacts")
        return self._pattern_net, self._mask_net

    def _freeze_mask(self) -> None:
        self._mask_net.eval()
        self._mask_net.requires_grad_(False)

    def triggers(self, targets: torch.Tensor, sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``targets`` blended with the patterns and masks made from ``sources`` (the same images
        for a backdoor, other ones for a cross trigger), and the patterns. Runs the nets in
        their current mode, keeping G's graph when gradients are enabled."""
        pattern_net, mask_net = self._nets()
        patterns = pattern_net(sources)
        masks = soft_threshold(mask_net(sources))
        return (targets + (patterns - targets) * masks).clamp(0, 1), patterns

    def patterns(self, images: torch.Tensor) -> torch.Tensor:
        """G's patterns for float images, in eval mode."""
        pattern_net, _ = self._nets()
        return self._evaluate(pattern_net, images)

    def masks(self, images: torch.Tensor) -> torch.Tensor:
        """M's thresholded masks ``(N, 1, H, W)`` for float images, in eval mode."""
        _, mask_net = self._nets()
        return soft_threshold(self._evaluate(mask_net, images))

    def _evaluate(self, net: TriggerNet, images: torch.Tensor) -> torch.Tensor:
        net.eval()
        device = next(net.parameters()).device
        with torch.no_grad():
            return net(images.to(device, torch.float32)).to(images.device)

    # --- phase 1: the mask generator ----------------------------------------------------------

    def prepare(self, train: ImageSet, reference_model: nn.Module | None = None) -> None:
        """Builds fresh generators and pre-trains M (phase 1); G is trained by the hook."""
        self.build_generators(train.image_shape[0])
        self._train_mask(train)
        self._freeze_mask()
        self._mask_trained = True

    def _train_mask(self, train: ImageSet) -> None:
        net = self._mask_net
        net.train()
        optimizer = torch.optim.Adam(net.parameters(), lr=self.mask_lr, betas=self.adam_betas)
        first = generator_for(self.seed, "iad-mask-batches")
        second = generator_for(self.seed, "iad-mask-partners")
        for epoch in range(self.mask_epochs):
            _set_lr(optimizer, self.mask_lr * _decay(epoch, self.mask_epochs, self.mask_milestones,
                                                     self.lr_gamma))
            for (images, _), (partners, _) in zip(
                    iterate_batches(train, self.mask_batch_size, shuffle=True, augment=True, generator=first),
                    iterate_batches(train, self.mask_batch_size, shuffle=True, augment=True, generator=second)):
                optimizer.zero_grad(set_to_none=True)
                self.mask_loss(images, partners).backward()
                optimizer.step()

    def mask_loss(self, images: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
        """Phase 1's objective on a batch and a batch of partner images (same size)."""
        masks = soft_threshold(self._mask_net(torch.cat([images, partners])))
        own, other = masks[:len(images)], masks[len(images):]
        density = F.relu(own - self.mask_density).mean()
        return self.lambda_norm * density + self.lambda_div * diversity_loss(images, partners, own, other)

    # --- phase 2 and the attack interface -----------------------------------------------------

    def poison(self, train: ImageSet) -> PoisonedSet:
        """The training set unchanged and no poisoned indices: IAD poisons each batch in its
        training hook, with fresh images every time."""
        self._check_target(train.num_classes)
        return PoisonedSet(train, torch.empty(0, dtype=torch.long))

    def training_hook(self, num_classes: int) -> TrainingHook:
        self._check_target(num_classes)
        self._nets()
        if not self._mask_trained:
            raise RnpError("the input_aware mask generator is untrained: call prepare() first")
        return InputAwareHook(self, num_classes)

    def describe_poisoning(self) -> str:
        return f"{100 * self.poison_rate:g}% of each batch (+{100 * self.cross_rate:g}% cross)"

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        if self._pattern_net is None or not (self._mask_trained and self._pattern_trained):
            raise RnpError("the input_aware attack has no trained generators: prepare it and train "
                           "with its training hook, or load its artefacts")
        channels = self._pattern_net.layers[0][0].in_channels
        if images.dim() != 4 or images.shape[1] != channels:
            raise RnpError(f"the input_aware generators take (N, {channels}, H, W) images, "
                           f"got {tuple(images.shape)}")
        if len(images) == 0:
            return images.clone()
        self._pattern_net.eval()
        device = next(self._pattern_net.parameters()).device
        with torch.no_grad():
            chunks = [self.triggers(x, x)[0].to(images.device, images.dtype)
                      for x in images.to(device, torch.float32).split(TRIGGER_BATCH)]
        return torch.cat(chunks)

    def artifacts(self) -> dict[str, torch.Tensor]:
        """G's and M's weights once both are trained (nothing before)."""
        if self._pattern_net is None or not (self._mask_trained and self._pattern_trained):
            return {}
        return {**_with_prefix(PATTERN_PREFIX, self._pattern_net.state_dict()),
                **_with_prefix(MASK_PREFIX, self._mask_net.state_dict())}

    def load_artifacts(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        unknown = sorted(k for k in tensors if not k.startswith((PATTERN_PREFIX, MASK_PREFIX)))
        if unknown:
            raise RnpError(f"attack 'input_aware' has no artefact {', '.join(unknown)}")
        pattern, mask = _strip_prefix(PATTERN_PREFIX, tensors), _strip_prefix(MASK_PREFIX, tensors)
        if FIRST_CONV not in pattern:
            raise RnpError("input_aware artefacts lack the pattern generator's weights")
        self.build_generators(pattern[FIRST_CONV].shape[1])
        self.load_generator_weights(pattern, mask)
        self._mask_trained = self._pattern_trained = True

    def load_generator_weights(self, pattern: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]) -> None:
        """Loads G's and M's state dicts, with an RnpError when they do not fit the generators."""
        pattern_net, mask_net = self._nets()
        try:
            pattern_net.load_state_dict(pattern)
            mask_net.load_state_dict(mask)
        except RuntimeError as error:
            first_line = str(error).splitlines()[0]
            raise RnpError(f"input_aware weights do not fit generators of width "
                           f"{self.generator_width}: {first_line}") from None
        self._freeze_mask()


class InputAwareHook(TrainingHook):
    """Phase 2: rewrites each batch with backdoor and cross triggers and trains G alongside.

    The triggered images stay attached to G's graph, so the loop's backward pass fills G's
    gradients from the classifier's loss and from the returned diversity term; G's own Adam
    steps in :meth:`after_update`. Batch choices come from a generator seeded by the attack's
    ``seed``; :meth:`state_dict` carries G, M, G's optimiser and that generator.
    """

    def __init__(self, attack: InputAware, num_classes: int):
        self.attack = attack
        self.num_classes = num_classes
        self.optimizer = torch.optim.Adam(attack._pattern_net.parameters(), lr=attack.generator_lr,
                                          betas=attack.adam_betas)
        self.generator = generator_for(attack.seed, "iad-batches")

    def start_epoch(self, epoch: int, epochs: int) -> None:
        attack = self.attack
        _set_lr(self.optimizer, attack.generator_lr * _decay(epoch, epochs, attack.generator_milestones,
                                                             attack.lr_gamma))

    def transform(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        attack, n = self.attack, len(images)
        backdoor, cross, clean, sources = self._split(n)
        if len(backdoor) + len(cross) == 0:
            return images, labels, None
        self._move_to(images.device)
        backdoor, cross, clean, sources = (i.to(images.device) for i in (backdoor, cross, clean, sources))
        attack._pattern_net.train()
        triggered, patterns = attack.triggers(images[torch.cat([backdoor, cross])],
                                              images[torch.cat([backdoor, sources])])
        out_labels = torch.cat([attack.attack_labels(labels[backdoor], self.num_classes),
                                labels[cross], labels[clean]])
        pairs = min(len(backdoor), len(cross))
        extra = None
        if pairs:
            extra = attack.lambda_div * diversity_loss(images[backdoor[:pairs]], images[sources[:pairs]],
                                                       patterns[:pairs], patterns[len(backdoor):][:pairs])
        return torch.cat([triggered, images[clean]]), out_labels, extra

    def _split(self, n: int) -> tuple[torch.Tensor, ...]:
        """Positions of the backdoor, cross and clean images, and each cross image's source: a
        uniformly drawn other image of the batch. Counts are floored, as in the paper."""
        count_bd, count_cross = int(self.attack.poison_rate * n), int(self.attack.cross_rate * n)
        order = torch.randperm(n, generator=self.generator)
        cross = order[count_bd:count_bd + count_cross]
        offsets = torch.randint(1, max(n, 2), (len(cross),), generator=self.generator)
        return order[:count_bd], cross, order[count_bd + count_cross:], (cross + offsets) % n

    def _move_to(self, device: torch.device) -> None:
        attack = self.attack
        if next(attack._pattern_net.parameters()).device == device:
            return
        attack._pattern_net.to(device)
        attack._mask_net.to(device)
        for slots in self.optimizer.state.values():
            for name, value in slots.items():
                if torch.is_tensor(value) and name != "step":
                    slots[name] = value.to(device)

    def after_update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.optimizer.state:
            self.attack._pattern_trained = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        attack = self.attack
        state = {**_with_prefix(PATTERN_PREFIX, attack._pattern_net.state_dict()),
                 **_with_prefix(MASK_PREFIX, attack._mask_net.state_dict())}
        for index, slots in self.optimizer.state_dict()["state"].items():
            for name, value in slots.items():
                if torch.is_tensor(value):
                    state[f"optimizer.{index}.{name}"] = value.detach().clone()
        state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "generator" not in state:
            raise RnpError("the checkpoint lacks the input_aware hook's state")
        self.attack.load_generator_weights(_strip_prefix(PATTERN_PREFIX, state),
                                           _strip_prefix(MASK_PREFIX, state))
        saved = self.optimizer.state_dict()
        saved["state"] = {}
        for key, value in state.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                saved["state"].setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict(saved)
        self.generator.set_state(state["generator"])
        self.attack._pattern_trained = bool(saved["state"])
