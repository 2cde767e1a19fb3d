"""Per-channel masks on any ``nn.Module``, and channel pruning.

A mask ``m`` multiplies one output channel's weights. Four kinds of layer can carry masks:

- ``batchnorm``: the scale, so the layer computes ``(gamma * m) x_hat + beta`` (the "filter
  level" of RNP and ANP);
- ``layernorm``: the per-feature scale, the same thing for transformer-style models;
- ``conv``: each output channel's filter of an ``nn.Conv1d/2d/3d`` (transposed convolutions
  keep their output channels in the second weight dimension and are not masked);
- ``linear``: each output feature's row of an ``nn.Linear``, except the model's last Linear
  layer, whose outputs are the class scores rather than features.

In every kind the bias is left alone, so a pruned channel outputs a constant (``beta`` or the
bias), as RNP does on BatchNorm. ``"auto"`` picks BatchNorm when the model has it (the paper's
choice), else LayerNorm (transformers), else convolution and linear channels (e.g. VGG without
BN). Masks are attached with ``torch.nn.utils.parametrize``, so they work on any model (ours, a
user's class, a torchvision model) without a masked copy of each architecture.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from rnp.errors import RnpError
from rnp.io.tables import csv_text


LAYER_KINDS = ("batchnorm", "layernorm", "conv", "linear")
AUTO_CHOICES = (("batchnorm",), ("layernorm",), ("conv", "linear"))


class ChannelMask(nn.Module):
    """Parametrization ``weight -> weight * mask`` with one mask value per output channel (the
    weight's first dimension), initially 1, on the weight's device and of its type."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.mask = nn.Parameter(torch.ones(weight.shape[0], device=weight.device, dtype=weight.dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.view(-1, *([1] * (weight.dim() - 1)))


def parse_layer_kinds(kinds: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"auto"``, one kind, or several (``"conv,linear"`` or a sequence) -> a tuple of kinds."""
    items = kinds.split(",") if isinstance(kinds, str) else list(kinds)
    items = tuple(item.strip() for item in items if item.strip())
    if items == ("auto",):
        return items
    unknown = [item for item in items if item not in LAYER_KINDS]
    if not items or unknown:
        raise RnpError(f"mask layers must be 'auto' or a comma-separated list of "
                       f"{', '.join(LAYER_KINDS)}; got {kinds!r}")
    return items


def maskable_layers(model: nn.Module, kinds="auto", *, skip_last: bool = False) -> list[tuple[str, nn.Module]]:
    """The model's layers of the given kinds that carry masks, in registration order.

    ``kinds="auto"`` takes the first of BatchNorm, LayerNorm, or convolution + linear that the
    model has. ``skip_last`` leaves out the last of them (in a PreAct-ResNet, the BatchNorm
    before pooling, whose channels feed the classifier directly). Raises :class:`RnpError`
    naming the layer types found when none qualifies.
    """
    kinds = parse_layer_kinds(kinds)
    candidates = AUTO_CHOICES if kinds == ("auto",) else (kinds,)
    for choice in candidates:
        layers = _layers_of(model, choice)
        if skip_last and len(layers) == 1:
            raise RnpError(f"the model has one maskable layer ({layers[0][0]}): skipping the last "
                           f"leaves nothing to mask")
        if layers:
            return layers[:-1] if skip_last else layers
    found = Counter(type(m).__name__ for m in model.modules() if not list(m.children()))
    summary = ", ".join(f"{name} x{count}" for name, count in found.most_common()) or "none"
    wanted = "BatchNorm, LayerNorm, convolution or hidden linear" if kinds == ("auto",) else "/".join(kinds)
    raise RnpError(f"the model has no {wanted} layer with learnable weights to put channel masks "
                   f"on (layer types found: {summary})")


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's BatchNorm layers that have a learnable scale (RnpError if there are none)."""
    return maskable_layers(model, ("batchnorm",))


def _layers_of(model: nn.Module, kinds: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    classifier = linears[-1] if linears else None

    def kind_of(module: nn.Module) -> str | None:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return "batchnorm" if module.affine else None
        if isinstance(module, nn.LayerNorm):
            return "layernorm" if module.elementwise_affine else None
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return "conv"
        if isinstance(module, nn.Linear):
            return "linear" if module is not classifier else None
        return None

    return [(name, module) for name, module in model.named_modules() if kind_of(module) in kinds]


@dataclass(frozen=True, eq=False)
class ChannelScores:
    """One value per channel over a list of layers, flattened in layer order.

    ``values[i]`` belongs to channel ``channels[i]`` of layer ``layer_names[layers[i]]``.
    """

    layer_names: tuple[str, ...]
    sizes: tuple[int, ...]
    values: torch.Tensor

    @property
    def layers(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes))

    @property
    def channels(self) -> torch.Tensor:
        return torch.cat([torch.arange(size) for size in self.sizes])

    def __len__(self) -> int:
        return len(self.values)

    def order(self, secondary: torch.Tensor | None = None) -> torch.Tensor:
        """Channel indices sorted by value, ascending; ties broken by ``secondary`` descending
        (when given) and then by position, so the order is deterministic."""
        index = torch.arange(len(self.values))
        if secondary is not None:
            index = torch.sort(-secondary, stable=True).indices
        return index[torch.sort(self.values[index], stable=True).indices]

    def rows(self) -> list[tuple[str, int, float]]:
        """``(layer, channel, value)`` for every channel, in layer order."""
        return [(self.layer_names[layer], int(channel), float(value)) for layer, channel, value
                in zip(self.layers.tolist(), self.channels.tolist(), self.values.tolist())]

    def to_csv(self) -> str:
        """The :meth:`rows` as CSV, values to six decimals."""
        return csv_text(["layer", "channel", "value"],
                        [(layer, channel, f"{value:.6f}") for layer, channel, value in self.rows()])


class MaskSet:
    """Masks attached to a model's layers of the given kinds (see :func:`maskable_layers`,
    ``skip_last`` too); :meth:`scores` reads them out."""

    def __init__(self, model: nn.Module, kinds="auto", *, skip_last: bool = False):
        self.layers = maskable_layers(model, kinds, skip_last=skip_last)
        for _, module in self.layers:
            parametrize.register_parametrization(module, "weight", ChannelMask(module.weight))

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [module.parametrizations.weight[0].mask for _, module in self.layers]

    def flat_grad(self) -> torch.Tensor:
        return torch.cat([p.grad.detach() if p.grad is not None else torch.zeros_like(p)
                          for p in self.parameters])

    @torch.no_grad()
    def clamp_(self, low: float = 0.0, high: float = 1.0) -> None:
        for mask in self.parameters:
            mask.clamp_(low, high)

    def scores(self) -> ChannelScores:
        return ChannelScores(tuple(name for name, _ in self.layers),
                             tuple(len(p) for p in self.parameters),
                             torch.cat([p.detach().cpu().clone() for p in self.parameters]))

    def fold(self) -> None:
        """Multiplies each masked layer's weights by their masks and removes the masks, so that
        the model is again a plain module of its own class that computes what it computed with
        them (the weight tensors stay the same objects)."""
        for _, module in self.layers:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


@torch.no_grad()
def prune_channels(model: nn.Module, scores: ChannelScores, channels) -> nn.Module:
    """Zeroes the weights of the given channels (indices into ``scores``) in place: the scale of
    a BatchNorm or LayerNorm channel, the filter of a convolution channel, the row of a linear
    feature. Biases stay, so a pruned channel outputs a constant."""
    modules = dict(model.named_modules())
    layers, positions = scores.layers, scores.channels
    for index in torch.as_tensor(channels, dtype=torch.long).tolist():
        name = scores.layer_names[int(layers[index])]
        modules[name].weight[int(positions[index])] = 0
    return model


@contextmanager
def channels_pruned(model: nn.Module, scores: ChannelScores, channels) -> Iterator[nn.Module]:
    """``model`` with the given channels pruned as :func:`prune_channels` does, for the duration
    of the ``with`` block; afterwards every weight holds exactly its old value again. Trying
    several prunings this way needs no copy of the model per pruning."""
    modules = dict(model.named_modules())
    layers, positions = scores.layers, scores.channels
    saved = []
    with torch.no_grad():
        for index in torch.as_tensor(channels, dtype=torch.long).tolist():
            weight, position = modules[scores.layer_names[int(layers[index])]].weight, int(positions[index])
            saved.append((weight, position, weight[position].clone()))
            weight[position] = 0
    try:
        yield model
    finally:
        with torch.no_grad():
            for weight, position, value in reversed(saved):
                weight[position] = value
