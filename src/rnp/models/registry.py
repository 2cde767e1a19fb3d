"""Build models by name from a small JSON-serialisable spec.

A spec (:func:`model_spec`) is everything needed to rebuild a model's architecture: saved
next to a state dict, it lets a checkpoint be loaded without knowing how it was trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import nn

from rnp.errors import RnpError
from rnp.models.normalize import channel_statistics
from rnp.models.preact_resnet import PreActResNet18
from rnp.models.resnet import ResNet18
from rnp.models.vgg import VGG

_BUILDERS = {
    "preact_resnet18": PreActResNet18,
    "resnet18": ResNet18,
    "vgg16_bn": partial(VGG, batch_norm=True),
    "vgg16": partial(VGG, batch_norm=False),
}

MODEL_NAMES = tuple(_BUILDERS)


def model_spec(arch: str, num_classes: int = 10, width: int = 64, in_channels: int = 3,
               mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> dict:
    """Check the arguments of :func:`build_model` and return them as a JSON-serialisable dict.

    ``build_model(**model_spec(...))`` builds the model the arguments describe. Raises
    :class:`RnpError` for an unknown architecture or an impossible size.
    """
    if arch not in _BUILDERS:
        raise RnpError(f"unknown model {arch!r}; choose one of: {', '.join(MODEL_NAMES)}")
    _check_int("num_classes", num_classes, minimum=2)
    _check_int("width", width, minimum=1)
    _check_int("in_channels", in_channels, minimum=1)
    mean, std = channel_statistics(in_channels, mean, std)
    mean = [float(m) for m in mean]
    std = [float(s) for s in std]
    if len(mean) != in_channels or len(std) != in_channels:
        raise RnpError(f"mean and std need one value per input channel ({in_channels}), "
                       f"got {len(mean)} and {len(std)}")
    if any(not s > 0 for s in std):
        raise RnpError(f"std must be positive, got {std}")
    return {"arch": arch, "num_classes": int(num_classes), "width": int(width),
            "in_channels": int(in_channels), "mean": mean, "std": std}


def build_model(arch: str, num_classes: int = 10, width: int = 64, in_channels: int = 3,
                mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> nn.Module:
    """Build architecture ``arch`` (one of :data:`MODEL_NAMES`) with fresh weights.

    ``width`` is the base channel count: 64 gives the paper-size models, 16 a quarter-width
    model that trains on a CPU. Every channel count scales as ``c * width // 64`` (at least 1).
    The model takes images in [0, 1] and normalises them with ``mean`` and ``std`` itself,
    through its ``normalize`` attribute; by default CIFAR-10's statistics for 3 channels and
    their average for 1 (see :func:`rnp.models.normalize.channel_statistics`).
    """
    spec = model_spec(arch, num_classes, width, in_channels, mean, std)
    try:
        return _BUILDERS[spec.pop("arch")](**spec)
    except (MemoryError, RuntimeError) as error:  # the CPU allocator's "can't allocate memory"
        raise RnpError(f"cannot build {arch} of width {width}: "
                       f"{str(error).splitlines()[0] if str(error) else 'out of memory'}") from None


def count_parameters(model: nn.Module) -> int:
    """The number of scalar parameters in ``model`` (buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RnpError(f"{name} must be an integer >= {minimum}, got {value!r}")
