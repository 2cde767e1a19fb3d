"""Training hooks: how an attack that acts during training plugs into the one training loop.

Most attacks only poison the data, but some (Input-Aware Dynamic, LIRA) train a trigger generator
jointly with the classifier. They hand the trainer a :class:`TrainingHook`; the loop calls it on
every batch, so the classifier is still trained by :func:`rnp.training.run_epoch` and nothing
else.
"""

from __future__ import annotations

import torch
from torch import nn


class TrainingHook:
    """Called by the training loop around each classifier update; every method is optional.

    Per batch the loop calls :meth:`transform` (before the classifier's gradients are cleared,
    so a hook may run its own forward and backward passes, e.g. to update a generator; under the
    step's autocast, so in mixed precision they run in bfloat16 or float16 as the step does), then
    descends the cross-entropy of the returned batch plus the returned extra loss, then calls
    :meth:`after_update`. :meth:`state_dict` and :meth:`load_state_dict` carry the hook's own
    state (generator weights, optimiser moments, random generator) through checkpoints, so an
    interrupted run resumes exactly.
    """

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called before epoch ``epoch`` (from 0) of ``epochs``."""

    def transform(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns the batch to train the classifier on and an extra loss to add (or None)."""
        return images, labels, None

    def after_update(self) -> None:
        """Called after the classifier's optimiser step."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores :meth:`state_dict`."""
