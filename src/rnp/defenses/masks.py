"""Per-channel masks on the BatchNorm scales of any ``nn.Module``, and channel pruning.

A mask ``m`` multiplies a BatchNorm layer's scale: the layer computes ``(gamma * m) x_hat + beta``
(the "filter level" of RNP). Masks are attached with ``torch.nn.utils.parametrize``, so they work
on any model that contains BatchNorm layers (ours, a user's class, a torchvision model) without
a masked copy of each architecture. Pruning a channel sets its ``gamma`` to zero and keeps
``beta`` and the running statistics, as RNP and ANP do: the channel then outputs the constant
``beta``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from rnp.errors import RnpError


class ChannelMask(nn.Module):
    """Parametrization ``weight -> weight * mask`` with one mask value per channel, initially 1."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.mask = nn.Parameter(torch.ones(num_channels))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's BatchNorm layers that have a learnable scale, in registration order.

    Raises :class:`RnpError` naming the layer types found when there are none.
    """
    layers = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine]
    if not layers:
        found = Counter(type(m).__name__ for m in model.modules() if not list(m.children()))
        kinds = ", ".join(f"{name} x{count}" for name, count in found.most_common()) or "none"
        raise RnpError("the model has no BatchNorm layer with a learnable scale, which RNP's "
                       f"masks act on (layer types found: {kinds})")
    return layers


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
        lines = ["layer,channel,value"]
        lines += [f"{layer},{channel},{value:.6f}" for layer, channel, value in self.rows()]
        return "\n".join(lines) + "\n"


class MaskSet:
    """Masks attached to a model's BatchNorm layers; :meth:`scores` reads them out."""

    def __init__(self, model: nn.Module):
        self.layers = batchnorm_layers(model)
        for _, module in self.layers:
            parametrize.register_parametrization(module, "weight", ChannelMask(module.num_features))

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
                             tuple(module.num_features for _, module in self.layers),
                             torch.cat([p.detach().cpu().clone() for p in self.parameters]))


@torch.no_grad()
def prune_channels(model: nn.Module, scores: ChannelScores, channels) -> nn.Module:
    """Zeroes the BatchNorm scale of the given channels (indices into ``scores``) in place."""
    modules = dict(model.named_modules())
    layers, positions = scores.layers, scores.channels
    for index in torch.as_tensor(channels, dtype=torch.long).tolist():
        name = scores.layer_names[int(layers[index])]
        modules[name].weight[int(positions[index])] = 0
    return model
