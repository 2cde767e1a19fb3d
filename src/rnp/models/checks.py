"""Checks that a model holds, and computes, usable numbers.

A model with NaN or infinite weights (a diverged training run, a damaged file) still runs, and
the ``argmax`` of NaN scores names some class, so without these checks such a model would be
evaluated and "defended" as if it were sound. Each check raises :class:`RnpError` in one line;
none changes the model or draws random numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from rnp.errors import RnpError

NAMES_SHOWN = 3


def check_finite_weights(model: nn.Module, what: str = "the model") -> None:
    """RnpError unless every floating-point parameter and buffer of ``model`` is finite,
    naming how many values are not and in which tensors (BatchNorm statistics included)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in tensors
           if t.is_floating_point() and not bool(torch.isfinite(t).all())}
    if bad:
        names = ", ".join(list(bad)[:NAMES_SHOWN]) + (", ..." if len(bad) > NAMES_SHOWN else "")
        count = sum(bad.values())
        raise RnpError(f"{what} has {count} non-finite weight{'s' * (count != 1)} "
                       f"(NaN or infinity, in {names})")


def check_logits(outputs, what: str = "the model") -> torch.Tensor:
    """``outputs`` if it is a finite ``(N, classes)`` tensor of class scores; else RnpError.

    A model whose forward returns a tuple (e.g. ``(logits, features)``) is refused rather than
    guessed at: wrap it in a module that returns the logits alone.
    """
    if not torch.is_tensor(outputs):
        raise RnpError(f"{what} returns a {type(outputs).__name__}, not a tensor of class scores; "
                       "wrap it in a module whose forward returns the logits alone")
    if outputs.dim() != 2:
        raise RnpError(f"{what} must output class scores (N, classes), got {tuple(outputs.shape)}")
    if not bool(torch.isfinite(outputs).all()):
        raise RnpError(f"{what} outputs non-finite class scores (NaN or infinity) for "
                       f"{int((~torch.isfinite(outputs)).any(1).sum())} of {len(outputs)} images; "
                       "its weights are too large (has a training diverged?)")
    return outputs
