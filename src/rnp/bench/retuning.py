"""How superficial a defense's safety is: the re-tuning attack.

Min, Qin, Zhang, Shen and Cheng, "Uncovering, Explaining, and Mitigating the Superficial Safety
of Backdoor Defense", NeurIPS 2024 (arXiv 2410.09838), fine-tune a purified model on a few
poisoned samples and find that the backdoor of most purified models comes back within a few
epochs, while a model that never had one stays clean. A user of a pruning defense wants to
know whether the backdoor was removed or only hidden; :func:`retune` measures it as the attack
success rate after each of a few epochs of fine-tuning.

The retuning set is ``fraction`` of the training set (1% here, as in the issue that asked for
this measurement) drawn from the subject's own poisoned training set, with ``poisoned_share``
of it carrying the trigger (by default the subject's poisoning rate, so the set looks like the
training data in miniature). The optimiser is SGD with the fine-tuning settings this package
uses elsewhere (lr 0.01, momentum 0.9, weight decay 5e-4, batch 128, crop+flip); the paper's
exact retuning recipe was not available to us, so these are our choices, recorded in every
result.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from rnp.data.poisoned import PoisonedSet, TriggeredSet
from rnp.errors import RnpError
from rnp.metrics.backdoor import accuracy
from rnp.training.evaluate import predict
from rnp.training.loop import run_epoch
from rnp.utils import generator_for, model_device


@dataclass
class RetuningConfig:
    """The re-tuning attack's settings."""

    epochs: tuple[int, ...] = (1, 5, 20)  # ASR is measured after each of these epochs
    fraction: float = 0.01  # share of the training set the attacker fine-tunes on
    poisoned_share: float | None = None  # share of that set carrying the trigger; None: the subject's rate
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    augment: bool = True
    seed: int = 0

    def __post_init__(self):
        self.epochs = tuple(sorted({int(e) for e in self.epochs}))
        if not self.epochs or self.epochs[0] < 1:
            raise RnpError("retuning epochs must be positive integers")
        if not 0 < self.fraction <= 1 or (self.poisoned_share is not None and not 0 < self.poisoned_share <= 1):
            raise RnpError("retuning fraction and poisoned_share must lie in (0, 1]")
        if self.lr <= 0 or self.batch_size < 1:
            raise RnpError("retuning lr and batch_size must be positive")


def retuning_set(poisoned: PoisonedSet, config: RetuningConfig, rate: float):
    """The attacker's small fine-tuning set: seeded draws of poisoned and clean samples."""
    size = max(1, round(config.fraction * len(poisoned.data)))
    share = rate if config.poisoned_share is None else config.poisoned_share
    count = min(len(poisoned.poisoned_indices), max(1, round(share * size)))
    if not len(poisoned.poisoned_indices):
        raise RnpError("the attack poisons no stored training sample (it poisons on the fly), "
                       "so there is nothing to re-tune on")
    generator = generator_for(config.seed, "retuning-set")
    is_poisoned = torch.zeros(len(poisoned.data), dtype=torch.bool)
    is_poisoned[poisoned.poisoned_indices] = True
    chosen_poisoned = poisoned.poisoned_indices[torch.randperm(len(poisoned.poisoned_indices),
                                                               generator=generator)[:count]]
    clean = (~is_poisoned).nonzero().squeeze(1)
    chosen_clean = clean[torch.randperm(len(clean), generator=generator)[:size - count]]
    return poisoned.data.subset(torch.cat([chosen_poisoned, chosen_clean])), count


def retune(model: nn.Module, data, triggered: TriggeredSet, config: RetuningConfig | None = None) -> dict:
    """Fine-tunes a copy of ``model`` on ``data`` (the retuning set) and returns
    ``{epoch: attack success rate}`` for each epoch in ``config.epochs``. ``model`` is untouched."""
    config = config or RetuningConfig()
    model = copy.deepcopy(model)
    device = model_device(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    generator = generator_for(config.seed, "retuning-batches")
    asr = {}
    for epoch in range(1, config.epochs[-1] + 1):
        run_epoch(model, data, optimizer, batch_size=config.batch_size, generator=generator,
                  augment=config.augment, device=device)
        if epoch in config.epochs:
            predictions = predict(model, triggered.data, device=device)
            asr[epoch] = accuracy(predictions, triggered.target_labels)
    return asr
