"""One pass over a dataset with an optimizer: the loop shared by training, unlearning and
mask recovery.

Backdoor training descends the cross-entropy, RNP's unlearning ascends it, RNP's recovery
descends a scaled copy of it with only the masks in the optimizer; they differ in what they
hand to :func:`run_epoch`, not in loops of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnp.data.images import ImageSet
from rnp.data.loader import iterate_batches
from rnp.training.hooks import TrainingHook
from rnp.training.precision import autocast, backward_and_step


@dataclass(frozen=True)
class StepInfo:
    """What one optimisation step saw: its loss and accuracy on the batch, before the update,
    and the labels the model predicted for the batch."""

    step: int
    loss: float
    accuracy: float
    batch_size: int
    predictions: torch.Tensor


@dataclass(frozen=True)
class EpochStats:
    """Mean loss and accuracy over the samples seen in one epoch (train mode, augmented)."""

    loss: float
    accuracy: float
    steps: int
    stopped: bool = False


def run_epoch(model: nn.Module, data: ImageSet, optimizer: torch.optim.Optimizer, *,
              batch_size: int = 128, generator: torch.Generator | None = None, augment: bool = True,
              ascent: bool = False, loss_scale: float = 1.0,
              after_step: Callable[[StepInfo], bool] | None = None,
              penalty: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
              hook: TrainingHook | None = None, progress=None, device="cpu",
              scaler: torch.amp.GradScaler | None = None, frozen_batchnorm: bool = False) -> EpochStats:
    """Trains ``model`` for one epoch over ``data`` in train mode.

    ``ascent`` maximises the cross-entropy instead of minimising it. ``after_step`` is called
    after every update; returning True ends the epoch at once (``stopped`` is then set), which
    is how a stopping rule checked per step works. ``penalty(images, labels, logits)`` returns a
term added to the objective after the forward pass (e.g. a distillation loss on activations
the forward pass recorded); it is not counted in the reported loss. ``hook`` lets an attack rewrite each batch
    and train its own parts alongside (see :class:`TrainingHook`). ``progress`` is an optional
    tqdm bar.

    With an enabled ``scaler`` the step runs in mixed precision: the forward pass, the loss and
    the penalty under :func:`torch.autocast` (float16 on CUDA, bfloat16 on the CPU), the
    backward pass and the update through the scaler, which skips a step whose gradients
    overflowed. A hook's ``transform`` runs under the same autocast, so its own passes through the
    classifier (BppAttack's PGD negatives, LIRA's generator step) are as cheap as the step's.
    Without a scaler (or with a disabled one) every step is computed exactly as in full precision.
    ``frozen_batchnorm`` keeps every BatchNorm layer in eval mode: it normalises with its running
    statistics and leaves them as they were, while its weight and bias still train.
    """
    device = torch.device(device)
    mixed = scaler is not None and scaler.is_enabled()
    model.train()
    if frozen_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    total_loss = correct = seen = steps = 0
    stopped = False
    for images, labels in iterate_batches(data, batch_size, shuffle=True, augment=augment,
                                          generator=generator, device=device):
        extra = None
        with autocast(mixed, device):
            if hook is not None:
                images, labels, extra = hook.transform(model, images, labels)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            objective = (-loss if ascent else loss) * loss_scale
            if extra is not None:
                objective = objective + extra
            if penalty is not None:
                objective = objective + penalty(images, labels, logits)
        optimizer.zero_grad(set_to_none=True)
        backward_and_step(objective, optimizer, scaler if mixed else None)
        if hook is not None:
            hook.after_update()
        predictions = logits.detach().argmax(1)
        batch_correct = int((predictions == labels).sum())
        loss_value = float(loss.detach())
        total_loss += loss_value * len(labels)
        correct += batch_correct
        seen += len(labels)
        steps += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
        info = StepInfo(steps, loss_value, batch_correct / len(labels), len(labels), predictions.cpu())
        if after_step is not None and after_step(info):
            stopped = True
            break
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), steps, stopped)
