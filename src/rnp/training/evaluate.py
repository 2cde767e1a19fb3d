"""The one evaluation routine: predictions of a model on an image set, in inference mode."""

from __future__ import annotations

import torch
from torch import nn

from rnp.data.images import ImageSet
from rnp.data.loader import iterate_batches
from rnp.models.checks import check_logits
from rnp.models.probes import eval_mode
from rnp.training.precision import autocast


def predict(model: nn.Module, data: ImageSet, *, batch_size: int = 512, device="cpu",
            return_logits: bool = False, mixed: bool = False) -> torch.Tensor:
    """Predicted labels (or logits) for every image, with the model in eval mode.

    The model's train/eval mode is restored afterwards. Inputs are fed in channels-last layout,
    which speeds up CPU convolutions without touching the model's own parameters. Outputs that
    are not a finite ``(N, classes)`` tensor are an :class:`RnpError`: the argmax of NaN scores
    would name an arbitrary class and pass for a prediction. ``mixed`` computes under
    :func:`rnp.training.precision.autocast` (logits come back as float32): for a defense's own
    evaluations in mixed precision; the benchmark's metrics are always float32.
    """
    outputs = []
    with eval_mode(model), torch.inference_mode(), autocast(mixed, device):
        for images, _ in iterate_batches(data, batch_size, device=device):
            logits = check_logits(model(images.contiguous(memory_format=torch.channels_last)))
            outputs.append(logits.float().cpu() if return_logits else logits.argmax(1).cpu())
    if not outputs:
        return torch.empty((0,) if not return_logits else (0, 0))
    return torch.cat(outputs)
