"""RNP's cost floor: the optimisation it cannot avoid, timed on the same machine as RNP itself.

RNP (Li et al., "Reconstructive Neuron Pruning for Backdoor Defense", ICML 2023, arXiv
2305.14876) optimises twice over the defender's clean images: gradient ascent until the clean
accuracy collapses (unlearning), then mask descent for ``recover_epochs`` epochs (recovering).
Its floor is that many images' worth of plain training steps:

- **Counted**: every image that goes through a forward and backward pass in either stage, i.e.
  the images of each unlearning step actually taken (a full ``batch_size`` batch, or the
  remainder at the end of an epoch) plus ``recover_epochs`` x the clean images.
- **Timed as**: :func:`optimisation_floor` runs that many images through forward pass,
  cross-entropy, backward pass and an SGD step (momentum 0.9, weight decay 5e-4, RNP's
  unlearning optimiser) with ALL weights trainable, on a copy of the model, in batches of
  ``batch_size`` drawn epoch by epoch from the clean set with RNP's augmentation, in RNP's
  precision and memory layout (its ``amp`` and ``channels_last``), so a bfloat16 RNP is not
  held against a float32 floor.
- **Not counted**: everything else RNP does (copies of the model, the probe of its inputs,
  the stopping rule's bookkeeping, the mask parametrizations, the pruning rule's evaluations,
  the final pruning, the report). The recovering stage trains the masks only, so its backward
  pass computes no weight gradients and is cheaper than the floor's; the floor still counts it
  as a full step, as the issue that defined the floor does.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from rnp.data.images import ImageSet
from rnp.data.loader import iterate_batches
from rnp.errors import RnpError
from rnp.training.precision import autocast, backward_and_step, grad_scaler
from rnp.utils import generator_for, model_device, uses_amp


def rnp_floor_images(result) -> int:
    """Images RNP passed forward and backward: its unlearning steps' images (from
    ``report["unlearning"]["per_step"]``, each step's batch size recomputed from its position
    in its epoch) plus ``recover_epochs`` x the clean images."""
    report = result.report
    clean, batch = report["clean_images"], report["config"]["batch_size"]
    within_epoch: dict[int, int] = {}
    unlearning = 0
    for step in report["unlearning"]["per_step"]:
        position = within_epoch.get(step["epoch"], 0)
        within_epoch[step["epoch"]] = position + 1
        unlearning += min(batch, clean - position * batch)
    return unlearning + report["config"]["recover_epochs"] * clean


def optimisation_floor(model: nn.Module, clean: ImageSet, *, images: int, batch_size: int = 128,
                       device=None, augment: bool = True, seed: int = 0, amp: str = "off",
                       channels_last: bool = False) -> float:
    """Seconds of ``images`` images' worth of plain training steps on a copy of ``model``.

    Batches of ``batch_size`` come epoch by epoch from ``clean`` (shuffled, augmented like
    RNP when ``augment``); the last batch is cut so that exactly ``images`` images are seen.
    Steps run under autocast where ``amp`` (a mode of :func:`rnp.utils.uses_amp`) computes in
    low precision on the device, with channels-last weights if ``channels_last``. One untimed
    warm-up step comes first, so the floor is the steady-state cost. ``model`` is not modified.
    """
    if images < 1 or batch_size < 1 or len(clean) == 0:
        raise RnpError("the floor needs a positive image count, a positive batch size and clean images")
    device = device if device is not None else model_device(model)
    mixed = uses_amp(amp, device)
    working = copy.deepcopy(model).to(device).train().requires_grad_(True)
    if channels_last:
        working.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(working.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = grad_scaler(mixed, device)
    generator = generator_for(seed, "optimisation-floor")

    def step(batch: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast(mixed, device):
            loss = F.cross_entropy(working(batch), labels)
        optimizer.zero_grad(set_to_none=True)
        backward_and_step(loss, optimizer, scaler)

    step(*next(iterate_batches(clean, batch_size, shuffle=True, augment=augment,
                               generator=generator, device=device)))
    _synchronize(device)
    start, left = time.perf_counter(), images
    while left > 0:
        for batch, labels in iterate_batches(clean, batch_size, shuffle=True, augment=augment,
                                             generator=generator, device=device):
            step(batch[:left], labels[:left])
            left -= min(left, len(labels))
            if left == 0:
                break
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
