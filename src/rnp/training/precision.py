"""Mixed precision and memory layout for the defenses that optimise.

Training (:class:`rnp.training.TrainConfig`) and RNP (:class:`rnp.defenses.RNPConfig`) carry
``amp`` and ``channels_last`` fields of their own; :class:`PrecisionFields` gives every other
defense that optimises the same two, under the same rule (:func:`rnp.utils.uses_amp`): "auto"
computes in bfloat16 on CPUs with native bfloat16 and in float16 on CUDA, where a training step
of PreAct-ResNet18 ran 2-4x faster than in float32 (``benchmarks/training_speed.py``). A
defense resolves both for its device (:func:`rnp.utils.resolve_precision`) and runs its
forward passes under :func:`autocast`, its updates through :func:`grad_scaler`'s scaler, and
its optimised copy of the model in :func:`model_layout`. Weights stay float32 parameters.
"""

from __future__ import annotations

import contextlib
from dataclasses import field, dataclass

import torch
from torch import nn

from rnp.utils import amp_dtype


@dataclass
class PrecisionFields:
    """The precision fields of a defense's config. Records leave both out at float32's values,
    so the records of runs made before the fields existed keep their meaning and keys."""

    amp: str = field(default="auto", metadata={"omit": "off"})
    """Mixed precision of the defense's optimisation and of the evaluations that steer it: auto
    (CUDA, and CPUs with native bfloat16), on (any CPU too) or off (float32, the papers');
    recorded as on or off, left out at off."""
    channels_last: bool | None = field(default=None, metadata={"omit": False})
    """Optimise with channels-last (NHWC) weights, faster for bfloat16 on CPUs with AMX; unset:
    on where bfloat16 runs on the CPU. The model comes back in the usual layout."""


def autocast(mixed: bool, device) -> contextlib.AbstractContextManager:
    """:func:`torch.autocast` to the device's low-precision type when ``mixed``, else a context
    that changes nothing."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=amp_dtype(device)) if mixed else contextlib.nullcontext()


def grad_scaler(mixed: bool, device) -> torch.amp.GradScaler | None:
    """A fresh gradient scaler for :func:`rnp.training.loop.run_epoch` when ``mixed`` (which
    makes the epoch run under autocast), else None: float32."""
    return torch.amp.GradScaler(torch.device(device).type) if mixed else None


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None) -> None:
    """Backpropagates ``loss`` and updates: through the ``scaler`` (which skips a step whose
    gradients overflowed) when there is one, plainly otherwise."""
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


@contextlib.contextmanager
def model_layout(model: nn.Module, channels_last: bool):
    """Holds ``model``'s weights in channels-last layout inside the block when ``channels_last``,
    and gives them back in the usual contiguous layout when it ends (values unchanged)."""
    if not channels_last:
        yield model
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        model.to(memory_format=torch.contiguous_format)
